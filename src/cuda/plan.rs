//! A whole round on the kernel path, planned once per shape: `weights -> score -> normalize ->
//! reduce -> select -> compact`.
//!
//! [`RoundPlan::new`] takes a cache shape — contiguous per-layer tensors with any row strides, or
//! paged block pools (vLLM's NHD, FlashInfer's HND) with the sequence's block-table row — and
//! validates every stage's spec on the host, decides the round's outcome (the
//! shape fixes it: within budget, skipped, or compressed) and lays out one workspace: the
//! constants every round reads (statistics, RoPE frequencies, the candidate range, the keep-set
//! index of each `(layer, KV head)`, the per-layer K/V address tables) followed by the scratch
//! buffers and outputs (weights, raw scores, tile partials, z-scores, reduced scores, keep sets,
//! slot map). [`RoundPlan::workspace_image`] is the host image of the constants, copied once into
//! the caller's workspace; [`RoundPlan::run`] then only launches, on whatever [`Launcher`] the
//! backend provides — no allocation, no copy, no synchronisation — so on the GPU a whole round can
//! be captured in a CUDA graph and replayed as `round_start` (read from device memory) advances.
//!
//! In the steady state of a decode the cache holds `budget + divide_length` slots at every round,
//! so one plan serves every round of a sequence.
//!
//! Stages that do not evict still run: a round within budget (or whose protected slots reach the
//! budget) selects every slot, so its scores and keep sets are still reported; it compacts only out
//! of place (a copy), never in place.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::policy::{CompressionConfig, GroupAggregation, Preset, RoundOutcome, SelectionMode};
use crate::round::Scorer;
use crate::score::{geometric_offsets, OffsetAggregation, TrigTerm};
use crate::shard::{ReduceOp, Reduction, Shard};
use crate::tuning::{ChoiceSource, Dispatch};
use crate::variant::{CompactMode, Variant};

use super::compact::{
    CompactAddresses, CompactLayout, CompactShape, CompactSpec, CompactTarget, PositionType, RowStrides,
};
use super::normalize::{NormalizeAddresses, NormalizeSpec};
use super::params::RowPartial;
use super::reduce::{
    FinishFrom, ReduceAddresses, ReduceShardAddresses, ReduceShardSpec, ReduceSpec, ShardPart, ShardStep,
};
use super::select::{SelectAddresses, SelectShape, SelectSpec};
use super::spec::{KeyLayout, PageOrder, ScoreAddresses, ScoreShape, ScoreSpec, TrigAddresses, TrigSpec, WeightsScope};

/// Where a round's compaction writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compaction {
    /// No compaction: the round ends with its keep sets (virtual eviction, or the caller moves
    /// the rows itself).
    KeepSetsOnly,
    /// Compact K and V in place in the given mode (only when the round evicts).
    InPlace(CompactMode),
    /// Copy the kept rows, in slot order, into separate destination tensors with these strides.
    OutOfPlace {
        /// Destination K strides (elements).
        keys: RowStrides,
        /// Destination V strides (elements).
        values: RowStrides,
    },
}

/// Where a round's K and V rows live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheLayout {
    /// Per layer one `K[Hkv, N, D]` and one `V[Hkv, N, Dv]` tensor with element strides.
    Contiguous {
        /// K strides (elements) of every layer.
        keys: RowStrides,
        /// V strides (elements) of every layer.
        values: RowStrides,
    },
    /// Per layer one K and one V block pool (`[num_blocks, block_size, Hkv, dim]` NHD, as vLLM,
    /// or `[num_blocks, Hkv, block_size, dim]` HND, as FlashInfer) and the sequence's
    /// block-table row `i32[max_blocks]` (distinct blocks), whose address is bound with the cache
    /// ([`CacheAddresses::block_table`]) and whose entries are read at run time.
    Paged {
        /// Slots per block, 16 to 256.
        block_size: usize,
        /// Axis order inside a block.
        order: PageOrder,
        /// Blocks in each layer's pool.
        num_blocks: usize,
        /// Entries of the block-table row.
        max_blocks: usize,
    },
}

/// The cache a round runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RoundShape {
    /// Element type of K and V.
    pub dtype: DType,
    /// Cached slots N.
    pub len: usize,
    /// Prompt slots at the front of the cache (protected under the `paper` preset).
    pub prefix_len: usize,
    /// Elements per V row, Dv.
    pub value_dim: usize,
    /// Where the rows live.
    pub layout: CacheLayout,
    /// What happens after selection.
    pub compaction: Compaction,
    /// Positions kept alongside the rows, if the caller tracks them on the device: `[sets, N]`
    /// (the position each slot holds, per keep set) at [`CacheAddresses::positions`], rewritten
    /// in place to the kept slots' positions, or written to `[sets, kept]` at
    /// [`CacheAddresses::positions_out`] out of place. Only read when the round compacts.
    pub positions: Option<PositionType>,
}

impl RoundShape {
    /// A contiguous cache whose K and V tensors are `[Hkv, capacity, dim]` (dense rows).
    pub fn dense(
        dtype: DType,
        len: usize,
        prefix_len: usize,
        head_dim: usize,
        value_dim: usize,
        capacity: usize,
    ) -> Self {
        RoundShape {
            dtype,
            len,
            prefix_len,
            value_dim,
            layout: CacheLayout::Contiguous {
                keys: RowStrides { head_stride: capacity * head_dim, row_stride: head_dim },
                values: RowStrides { head_stride: capacity * value_dim, row_stride: value_dim },
            },
            compaction: Compaction::KeepSetsOnly,
            positions: None,
        }
    }

    /// The same shape with positions of `ty` compacted alongside the rows.
    pub fn with_positions(self, ty: PositionType) -> Self {
        RoundShape { positions: Some(ty), ..self }
    }

    /// The same shape with `compaction`.
    pub fn with_compaction(self, compaction: Compaction) -> Self {
        RoundShape { compaction, ..self }
    }
}

/// One launch of a round, as a [`Launcher`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// The per-round weights (f64 trigonometry), part of scoring.
    Weights,
    /// Raw scores and z-score tile partials.
    Score,
    /// z-score finalisation.
    Normalize,
    /// Group and layer reduction with the protection guards.
    Reduce,
    /// Top-k.
    Select,
    /// Moving K and V.
    Compact,
    /// Sparse decode attention (a decode, not a round).
    Decode,
    /// Merging a split decode's parts.
    Combine,
}

impl Stage {
    /// Every stage of a round, in launch order.
    pub const ALL: [Stage; 6] =
        [Stage::Weights, Stage::Score, Stage::Normalize, Stage::Reduce, Stage::Select, Stage::Compact];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Weights => "weights",
            Stage::Score => "score",
            Stage::Normalize => "normalize",
            Stage::Reduce => "reduce",
            Stage::Select => "select",
            Stage::Compact => "compact",
            Stage::Decode => "decode",
            Stage::Combine => "combine",
        }
    }
}

/// Time spent in each stage of a round or decode, indexed by [`Stage`] (wall time under emu,
/// CUDA event time on the GPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTimings(pub [std::time::Duration; 8]);

impl StageTimings {
    /// Time of `stage`.
    pub fn get(&self, stage: Stage) -> std::time::Duration {
        self.0[stage as usize]
    }

    /// Add `time` to `stage`.
    pub fn add(&mut self, stage: Stage, time: std::time::Duration) {
        self.0[stage as usize] += time;
    }
}

/// Launches kernels of the variant table on one backend (the GPU on a stream, or emu).
pub trait Launcher {
    /// Launch `variant` with `params` over `grid` with `dynamic_smem` bytes of dynamic shared
    /// memory, as `stage` of a round.
    ///
    /// # Safety
    /// `params` is the params struct of `variant`'s kernel and every address in it is valid
    /// memory of this backend for every access the kernel makes at this grid.
    unsafe fn launch<P: Copy>(
        &mut self,
        stage: Stage,
        variant: Variant,
        params: &P,
        grid: (u32, u32, u32),
        dynamic_smem: usize,
    ) -> Result<()>;
}

/// What a run reads besides the plan: device addresses on the GPU, host addresses under emu.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoundAddresses {
    /// The workspace base.
    pub workspace: u64,
    /// One `i64`: the round's `round_start` (the number of tokens written so far).
    pub round_start: u64,
    /// The sequence's block-table row (paged caches), else 0.
    pub block_table: u64,
    /// Positions `[sets, N]` (a shape with positions that compacts), else 0.
    pub positions: u64,
    /// Kept positions `[sets, kept]` out of place, else 0.
    pub positions_out: u64,
}

impl RoundAddresses {
    /// The run addresses of a workspace bound to `cache`.
    pub fn bound(workspace: u64, round_start: u64, cache: &CacheAddresses) -> Self {
        RoundAddresses {
            workspace,
            round_start,
            block_table: cache.block_table,
            positions: cache.positions,
            positions_out: cache.positions_out,
        }
    }
}

/// A byte range of the workspace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Region {
    /// Byte offset from the workspace base (a multiple of [`WORKSPACE_ALIGN`]).
    pub offset: usize,
    /// Bytes.
    pub bytes: usize,
}

impl Region {
    /// Address of the region in a workspace at `base`.
    pub fn at(&self, base: u64) -> u64 {
        base + self.offset as u64
    }
}

/// Alignment of every region and of the workspace base the caller provides.
pub const WORKSPACE_ALIGN: usize = 256;

/// Alignment the kernels need of every K/V base: rows move in 16-byte vectors.
pub const ROW_ALIGN: usize = 16;

/// Refuse a null address, or one that is not a multiple of `align`.
pub(crate) fn check_address(what: impl std::fmt::Display, address: u64, align: usize) -> Result<()> {
    if address == 0 {
        return Err(Error::invalid_argument(what, "a non-null address", "0x0"));
    }
    check_aligned(what, address, align)
}

/// Refuse an address that is not a multiple of `align` (the kernels' vector or element width;
/// a misaligned access is a sticky fault on a GPU, so it is refused here by name).
fn check_aligned(what: impl std::fmt::Display, address: u64, align: usize) -> Result<()> {
    if !address.is_multiple_of(align as u64) {
        return Err(Error::invalid_argument(
            what,
            format!("an address aligned to {align} bytes"),
            format!("{address:#x}"),
        ));
    }
    Ok(())
}

/// Check a workspace base: non-null and aligned to [`WORKSPACE_ALIGN`].
///
/// # Errors
/// `InvalidArgument` naming the workspace.
pub fn check_workspace_address(workspace: u64) -> Result<()> {
    if workspace == 0 {
        return Err(Error::invalid_argument("workspace", "a non-null address", "0x0"));
    }
    check_aligned("workspace", workspace, WORKSPACE_ALIGN)
}

/// Where everything lives in a round's workspace. The constants come first
/// (`0..constants_bytes`), then scratch and outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkspaceLayout {
    /// f32 `[L, H, F]`.
    pub q_mean_real: Region,
    /// f32 `[L, H, F]`.
    pub q_mean_imag: Region,
    /// f32 `[L, H, F]`.
    pub q_abs_mean: Region,
    /// f64 `[F]` RoPE frequencies.
    pub omega: Region,
    /// i32 `[4, S]`: per sequence the slot count N, the first and one-past-last z-score
    /// candidate, the protected prompt.
    pub lengths: Region,
    /// i32 `[L * Hkv]` keep set of each (layer, KV head).
    pub set_index: Region,
    /// u64 `[S * L]` K bases, sequence-major (paged: the `L` pools, repeated per sequence).
    pub key_table: Region,
    /// u64 `[S * L]` V bases.
    pub value_table: Region,
    /// u64 `[S * L]` destination K bases (out of place; the K table otherwise).
    pub key_out_table: Region,
    /// u64 `[S * L]` destination V bases.
    pub value_out_table: Region,
    /// End of the constants.
    pub constants_bytes: usize,
    /// Weights: f32 `[L, H, V, D]` (mean) or the u16 level image (max); empty when V = 0.
    pub weights: Region,
    /// f32 `[L, H, F]`.
    pub norm: Region,
    /// f32 `[S, L, H, N]` raw scores.
    pub raw: Region,
    /// RowPartial `[L, H, tiles]`.
    pub partials: Region,
    /// f32 `[S, L, H, N]` z-scores (empty without normalisation: reduce reads `raw`).
    pub z: Region,
    /// f32 `[S, sets, N]` the scores selection ranks (protected slots `+inf`).
    pub score: Region,
    /// i32 `[S, sets, K]` kept slots, ascending (K = the budget, or N when nothing is evicted).
    pub keep: Region,
    /// Scratch of the multi-block select (empty for rows of the single-block path).
    pub select_scratch: Region,
    /// i32 `[S, sets, K]` original slot held by each slot after compaction (empty without one).
    pub slot_map: Region,
    /// A sharded plan's i32 keys `[S, rows, N]` (group or union maxima), exposed to the engine's
    /// all-reduce (empty otherwise).
    pub shard_keys: Region,
    /// A sharded plan's f64 sums `[S, rows, N]` (layer or group sums), exposed to the engine's
    /// all-reduce (empty otherwise).
    pub shard_sums: Region,
    /// Total bytes.
    pub total_bytes: usize,
}

struct Allocator {
    next: usize,
}

impl Allocator {
    fn take(&mut self, bytes: usize) -> Region {
        let r = Region { offset: self.next, bytes };
        self.next += bytes.div_ceil(WORKSPACE_ALIGN) * WORKSPACE_ALIGN;
        r
    }
}

/// A validated round for one shape: every stage's spec and the workspace layout.
#[derive(Clone, Debug)]
pub struct RoundPlan {
    shape: RoundShape,
    prefix_lens: Vec<usize>,
    seqs: usize,
    num_layers: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sets: usize,
    kept: usize,
    outcome: RoundOutcome,
    stages: StageSpecs,
    layout: WorkspaceLayout,
    constants: Vec<u8>,
    /// The shard a sharded plan runs on, and its reduction steps when it needs collectives.
    shard: Option<(Shard, Option<ShardSteps>)>,
}

/// The reduce stage of a sharded plan, in steps around the exposed collectives.
#[derive(Clone, Debug)]
struct ShardSteps {
    /// The collectives, in order, their lengths covering every sequence of the plan.
    reductions: Vec<Reduction>,
    partial: ReduceShardSpec,
    layer_sum: Option<ReduceShardSpec>,
    finish: ReduceShardSpec,
}

impl ShardSteps {
    /// The steps of `shard`'s reduction for `config` over `seqs` sequences of `n` slots (its z
    /// laid out `[S, L, H, N]`, its output `[S, sets, N]`), or `None` when it needs no collective.
    fn new(
        shard: &Shard,
        config: &CompressionConfig,
        n: usize,
        seqs: usize,
        protection: crate::policy::Protection,
    ) -> Result<Option<Self>> {
        let mut reductions = shard.reductions(config, n);
        if reductions.is_empty() {
            return Ok(None);
        }
        for r in &mut reductions {
            r.len *= seqs;
        }
        let (l, h, hkv) = (shard.layers.len(), shard.heads.len(), shard.kv_heads.len());
        let global = &shard.layout;
        let sets = config.mode.num_sets(l, hkv);
        let (part, layer_sum, from) = match config.mode {
            SelectionMode::PerHead if shard.group_split() => {
                (ShardPart::GroupKeys, true, FinishFrom::Sums { divisor: global.num_layers as f64 })
            }
            SelectionMode::PerHead => {
                (ShardPart::LayerSums, false, FinishFrom::Sums { divisor: global.num_layers as f64 })
            }
            SelectionMode::PerLayerPerHead => match config.group_aggregation {
                GroupAggregation::Max => (ShardPart::GroupKeys, false, FinishFrom::Keys),
                GroupAggregation::Mean => (
                    ShardPart::GroupSums,
                    false,
                    FinishFrom::Sums { divisor: (global.num_heads / global.num_kv_heads) as f64 },
                ),
            },
            SelectionMode::Union => (ShardPart::UnionKeys, false, FinishFrom::Keys),
        };
        let spec = |step| ReduceShardSpec {
            step,
            num_layers: l,
            num_heads: h,
            num_kv_heads: hkv,
            len: n,
            layer_stride: h * n,
            head_stride: n,
            z_seq_stride: l * h * n,
            out_stride: n,
            out_seq_stride: sets * n,
            prefix: if seqs > 1 { 0 } else { protection.prefix },
            window_start: protection.window_start,
            num_seqs: seqs,
        };
        let steps = ShardSteps {
            reductions,
            partial: spec(ShardStep::Partial(part)),
            layer_sum: layer_sum.then(|| spec(ShardStep::LayerSum)),
            finish: spec(ShardStep::Finish { from, rows: sets }),
        };
        for s in [Some(&steps.partial), steps.layer_sum.as_ref(), Some(&steps.finish)].into_iter().flatten() {
            s.validate()?;
        }
        Ok(Some(steps))
    }

    /// i32 keys and f64 sums the steps need, in elements.
    fn buffer_lens(&self) -> (usize, usize) {
        let specs = [Some(&self.partial), self.layer_sum.as_ref(), Some(&self.finish)];
        let keys = specs.iter().flatten().map(|s| s.keys_len()).max().unwrap_or(0);
        let sums = specs.iter().flatten().map(|s| s.sums_len()).max().unwrap_or(0);
        (keys, sums)
    }
}

/// The per-layer K and V bases a plan's workspace is bound to (device addresses on the GPU, host
/// addresses under emu). The destination tables are only read out of place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheAddresses {
    /// `[L]` K tensors.
    pub keys: Vec<u64>,
    /// `[L]` V tensors.
    pub values: Vec<u64>,
    /// `[L]` destination K tensors (out of place), else empty.
    pub keys_out: Vec<u64>,
    /// `[L]` destination V tensors (out of place), else empty.
    pub values_out: Vec<u64>,
    /// The sequence's block-table row `i32[max_blocks]` (paged caches), else 0. Its address is
    /// passed to every run; its entries are read on the device at run time.
    pub block_table: u64,
    /// Positions `[sets, N]` (a shape with positions), else 0.
    pub positions: u64,
    /// Out of place: the kept positions `[sets, kept]`, else 0.
    pub positions_out: u64,
}

/// The outputs a run leaves in its workspace, read back on the host.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundOutputs {
    /// Raw scores per layer, `[H, N]` each.
    pub raw: Vec<Vec<f32>>,
    /// The scores selection ranked, `[sets, N]` (protected slots `+inf`).
    pub score: Vec<f32>,
    /// Keep sets, ascending, `kept` slots each.
    pub keep: Vec<Vec<u32>>,
    /// The compaction's slot map per set (empty without a compaction).
    pub slot_map: Vec<Vec<u32>>,
}

fn read_f32(buf: &[u8], offset: usize, count: usize) -> Vec<f32> {
    buf[offset..offset + count * 4].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read_sets(buf: &[u8], offset: usize, sets: usize, kept: usize) -> Vec<Vec<u32>> {
    let flat: Vec<u32> = buf[offset..offset + sets * kept * 4]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
        .collect();
    flat.chunks(kept.max(1)).take(sets).map(<[u32]>::to_vec).collect()
}

/// Which per-layer tensors of a round a host buffer list holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(any(feature = "emu", feature = "cuda")), allow(dead_code))]
pub(crate) enum LayerTensors {
    /// K (tensors, or pools when paged).
    Keys,
    /// V.
    Values,
    /// Out-of-place destination K.
    KeysOut,
    /// Out-of-place destination V.
    ValuesOut,
}

/// Check the element type and that each of `lens` (elements of one buffer per layer) holds what
/// the plan reaches in `which` (host-buffer entry points of every backend).
#[cfg_attr(not(any(feature = "emu", feature = "cuda")), allow(dead_code))]
pub(crate) fn check_layers<T: crate::dtype::Element>(
    plan: &RoundPlan,
    which: LayerTensors,
    lens: &[usize],
) -> Result<()> {
    let s = &plan.shape;
    if T::DTYPE != s.dtype {
        return Err(Error::shape("cache dtype", s.dtype, T::DTYPE));
    }
    let (what, dim) = match which {
        LayerTensors::Keys => ("k", plan.head_dim),
        LayerTensors::Values => ("v", s.value_dim),
        LayerTensors::KeysOut => ("destination k", plan.head_dim),
        LayerTensors::ValuesOut => ("destination v", s.value_dim),
    };
    let count = plan.table_len();
    if lens.len() != count {
        let expected =
            if count == plan.num_layers { format!("{count}") } else { format!("{count} (sequences x layers)") };
        return Err(Error::shape(format!("{what} tensors"), expected, lens.len()));
    }
    let hkv = plan.num_kv_heads;
    let rows = |slots: usize, st: RowStrides| (hkv - 1) * st.head_stride + (slots - 1) * st.row_stride + dim;
    let needed = match (which, s.layout, s.compaction) {
        (LayerTensors::KeysOut, _, Compaction::OutOfPlace { keys, .. }) => rows(plan.kept, keys),
        (LayerTensors::ValuesOut, _, Compaction::OutOfPlace { values, .. }) => rows(plan.kept, values),
        (LayerTensors::KeysOut | LayerTensors::ValuesOut, ..) => {
            return Err(Error::invalid_argument(format!("{what} tensors"), "none (the plan compacts in place)", "some"))
        }
        (LayerTensors::Keys, CacheLayout::Contiguous { keys, .. }, _) => rows(s.len, keys),
        (LayerTensors::Values, CacheLayout::Contiguous { values, .. }, _) => rows(s.len, values),
        (_, CacheLayout::Paged { block_size, num_blocks, .. }, _) => num_blocks * block_size * hkv * dim,
    };
    for (layer, &len) in lens.iter().enumerate() {
        if len < needed {
            return Err(Error::shape(format!("{what}.{layer} elements"), format!("at least {needed}"), len));
        }
    }
    Ok(())
}

/// Check a paged plan's block table `i32[S, max_blocks]`: each sequence's entries cover N slots,
/// inside the pool, and no block is used twice in the batch.
#[cfg_attr(not(any(feature = "emu", feature = "cuda")), allow(dead_code))]
pub(crate) fn check_block_table(plan: &RoundPlan, table: &[i32]) -> Result<()> {
    let CacheLayout::Paged { block_size, num_blocks, max_blocks, .. } = plan.shape.layout else {
        return Err(Error::invalid_argument("block table", "none (contiguous cache)", "a block table"));
    };
    let rows = plan.seqs;
    if table.len() < rows * max_blocks {
        return Err(Error::shape(
            "block table",
            format!("{} entries ([{rows}, {max_blocks}])", rows * max_blocks),
            table.len(),
        ));
    }
    let used = plan.shape.len.div_ceil(block_size);
    let mut seen = vec![false; num_blocks];
    for seq in 0..rows {
        for (i, &b) in table[seq * max_blocks..seq * max_blocks + used].iter().enumerate() {
            if b < 0 || b as usize >= num_blocks || std::mem::replace(&mut seen[b as usize], true) {
                let at = if rows == 1 { format!("block table [{i}]") } else { format!("block table [{seq}, {i}]") };
                return Err(Error::invalid_argument(at, format!("a distinct block in 0..{num_blocks}"), b));
            }
        }
    }
    Ok(())
}

fn push_bytes(image: &mut [u8], region: Region, bytes: &[u8]) {
    image[region.offset..region.offset + bytes.len()].copy_from_slice(bytes);
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The outcome of a round over `n` slots for every sequence of a batch, and each sequence's
/// protected slots: a batch compresses (or stays within budget) as a whole, so a member whose
/// protected slots reach the budget is refused (planned alone, it is skipped).
fn batch_outcome(
    config: &CompressionConfig,
    n: usize,
    prefix_lens: &[usize],
) -> Result<(RoundOutcome, Vec<crate::policy::Protection>)> {
    let seqs = prefix_lens.len();
    if seqs == 0 || seqs > 65535 {
        return Err(Error::invalid_argument("sequences of a round", "1..=65535", seqs));
    }
    if n == 0 || n > i32::MAX as usize {
        return Err(Error::invalid_argument("round slots", "1..=2^31-1", n));
    }
    let name = |seq: usize| if seqs == 1 { "prefix_len".to_string() } else { format!("prefix_len of sequence {seq}") };
    for (seq, &p) in prefix_lens.iter().enumerate() {
        if p > n {
            return Err(Error::invalid_argument(name(seq), format!("<= the {n} cached slots"), p));
        }
    }
    let outcomes: Vec<RoundOutcome> = prefix_lens.iter().map(|&p| config.outcome(n, p)).collect();
    if seqs > 1 {
        if let Some(seq) = outcomes.iter().position(|o| matches!(o, RoundOutcome::Skipped(_))) {
            return Err(Error::invalid_argument(
                name(seq),
                format!("fewer protected slots than the budget {} (plan a skipped sequence alone)", config.budget),
                prefix_lens[seq],
            ));
        }
    }
    Ok((outcomes[0], prefix_lens.iter().map(|&p| config.protection(n, p)).collect()))
}

/// Every stage's validated launch description.
#[derive(Clone, Debug)]
struct StageSpecs {
    trig: TrigSpec,
    score: ScoreSpec,
    normalize: Option<NormalizeSpec>,
    reduce: ReduceSpec,
    select: SelectSpec,
    compact: Option<CompactSpec>,
    /// Where the score, select and compact variants came from.
    sources: [ChoiceSource; 3],
}

impl StageSpecs {
    /// The specs of a round of `seqs` sequences over `shape` keeping `kept` slots per set
    /// (`protection`: the first sequence's, whose scalar guards a one-sequence plan keeps; a
    /// batch reads each sequence's prompt from the workspace).
    fn new(
        scorer: &Scorer,
        config: &CompressionConfig,
        shape: &RoundShape,
        seqs: usize,
        protection: crate::policy::Protection,
        kept: usize,
        dispatch: &Dispatch,
    ) -> Result<Self> {
        let m = &scorer.model;
        let (l, h, hkv, d) = (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim);
        let (n, sets) = (shape.len, config.mode.num_sets(l, hkv));
        let batched = seqs > 1;
        let offsets = geometric_offsets(config.score.offset_max_length)?.len();
        let vectors = match (config.score.trig, config.score.aggregation) {
            (TrigTerm::Excluded, _) => 0,
            (TrigTerm::Included, OffsetAggregation::Mean) => 1,
            (TrigTerm::Included, OffsetAggregation::Max) => offsets,
        };
        let trig = TrigSpec {
            num_layers: l,
            num_heads: h,
            head_dim: d,
            num_seqs: seqs,
            num_offsets: offsets,
            vectors,
            style: scorer.style,
            sigma: scorer.sigma,
            norm: config.score.norm,
        };
        trig.validate()?;
        let (score, score_source) = ScoreSpec::tuned(
            ScoreShape {
                dtype: shape.dtype,
                head_dim: d,
                num_layers: l,
                num_heads: h,
                num_kv_heads: hkv,
                num_seqs: seqs,
                max_len: n,
                vectors,
                aggregation: if vectors > 1 { OffsetAggregation::Max } else { OffsetAggregation::Mean },
                style: scorer.style,
                layout: match shape.layout {
                    CacheLayout::Contiguous { keys, .. } => {
                        KeyLayout::Contiguous { head_stride: keys.head_stride, row_stride: keys.row_stride }
                    }
                    CacheLayout::Paged { block_size, order, num_blocks, max_blocks } => {
                        KeyLayout::Paged { block_size, order, num_blocks, max_blocks }
                    }
                },
                weights: if batched { WeightsScope::PerSequence } else { WeightsScope::Shared },
            },
            dispatch,
        )?;
        let normalize = match config.zscore() {
            None => None,
            Some(flavour) => {
                let spec = NormalizeSpec {
                    rows: seqs * l * h,
                    len: n,
                    num_tiles: score.num_tiles(),
                    raw_stride: n,
                    out_stride: n,
                    flavour,
                };
                spec.validate()?;
                Some(spec)
            }
        };
        let reduce = ReduceSpec {
            num_layers: l,
            num_heads: h,
            num_kv_heads: hkv,
            len: n,
            layer_stride: h * n,
            head_stride: n,
            out_stride: n,
            mode: config.mode,
            group: config.group_aggregation,
            prefix: if batched { 0 } else { protection.prefix },
            window_start: protection.window_start,
            num_seqs: seqs,
            z_seq_stride: l * h * n,
            out_seq_stride: sets * n,
        };
        reduce.validate()?;
        let (select, select_source) = SelectSpec::tuned(
            SelectShape {
                rows: seqs * sets,
                len: n,
                prefix: if batched { 0 } else { protection.prefix },
                window_start: protection.window_start,
                budget: kept,
                score_stride: n,
                keep_stride: kept,
                rows_per_seq: if batched { sets } else { 0 },
            },
            dispatch,
        )?;
        let (compact, compact_source) = match Self::compact(shape, l, hkv, d, sets, seqs, kept, dispatch)? {
            Some((spec, source)) => (Some(spec), source),
            None => (None, ChoiceSource::BuiltIn),
        };
        let sources = [score_source, select_source, compact_source];
        Ok(Self { trig, score, normalize, reduce, select, compact, sources })
    }

    /// The compaction of the round, if it moves rows, and where its variant came from.
    #[allow(clippy::too_many_arguments)]
    fn compact(
        shape: &RoundShape,
        l: usize,
        hkv: usize,
        d: usize,
        sets: usize,
        seqs: usize,
        kept: usize,
        dispatch: &Dispatch,
    ) -> Result<Option<(CompactSpec, ChoiceSource)>> {
        let n = shape.len;
        let compact_shape = |mode, target, layout| CompactShape {
            mode,
            target,
            elem_bytes: shape.dtype.size(),
            num_layers: l,
            num_kv_heads: hkv,
            num_sets: sets,
            num_slots: n,
            keep_len: kept,
            key_dim: d,
            value_dim: shape.value_dim,
            layout,
            positions: shape.positions,
            num_seqs: seqs,
        };
        Ok(match shape.compaction {
            Compaction::KeepSetsOnly => None,
            Compaction::InPlace(_) if kept == n => None,
            Compaction::InPlace(mode) => {
                let layout = match shape.layout {
                    CacheLayout::Contiguous { keys, values } => {
                        CompactLayout::Contiguous { k: keys, v: values, k_dst: keys, v_dst: values }
                    }
                    CacheLayout::Paged { block_size, order, num_blocks, max_blocks } => {
                        CompactLayout::Paged { block_size, order, num_blocks, max_blocks }
                    }
                };
                Some(CompactSpec::tuned(compact_shape(mode, CompactTarget::InPlace, layout), dispatch)?)
            }
            Compaction::OutOfPlace { keys: k_dst, values: v_dst } => {
                let CacheLayout::Contiguous { keys, values } = shape.layout else {
                    return Err(Error::invalid_argument(
                        "compaction of a paged cache",
                        "in place (or keep sets only)",
                        "out of place",
                    ));
                };
                let layout = CompactLayout::Contiguous { k: keys, v: values, k_dst, v_dst };
                Some(CompactSpec::tuned(
                    compact_shape(CompactMode::OrderPreserving, CompactTarget::OutOfPlace, layout),
                    dispatch,
                )?)
            }
        })
    }
}

impl WorkspaceLayout {
    /// The regions of a round of `stages`: constants first, then scratch and outputs.
    fn new(
        stages: &StageSpecs,
        scorer: &Scorer,
        shape: &RoundShape,
        seqs: usize,
        sets: usize,
        kept: usize,
        shard_buffers: (usize, usize),
    ) -> Self {
        let m = &scorer.model;
        let (l, h, hkv, f) = (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim / 2);
        let n = shape.len;
        let stats_bytes = l * h * f * 4;
        let mut a = Allocator { next: 0 };
        let mut layout = WorkspaceLayout {
            q_mean_real: a.take(stats_bytes),
            q_mean_imag: a.take(stats_bytes),
            q_abs_mean: a.take(stats_bytes),
            omega: a.take(f * 8),
            lengths: a.take(16 * seqs),
            set_index: a.take(l * hkv * 4),
            key_table: a.take(seqs * l * 8),
            value_table: a.take(seqs * l * 8),
            key_out_table: a.take(seqs * l * 8),
            value_out_table: a.take(seqs * l * 8),
            ..Default::default()
        };
        layout.constants_bytes = a.next;
        let weight_elem = if stages.trig.vectors > 1 { 2 } else { 4 };
        layout.weights = a.take(stages.trig.weights_len() * weight_elem);
        layout.norm = a.take(stats_bytes);
        layout.raw = a.take(stages.score.raw_len() * 4);
        layout.partials = a.take(stages.score.partials_len() * std::mem::size_of::<RowPartial>());
        layout.z = a.take(if stages.normalize.is_some() { seqs * l * h * n * 4 } else { 0 });
        layout.score = a.take(seqs * sets * n * 4);
        layout.keep = a.take(seqs * sets * kept * 4);
        layout.select_scratch = a.take(stages.select.scratch_bytes());
        layout.slot_map = a.take(if stages.compact.is_some() { seqs * sets * kept * 4 } else { 0 });
        layout.shard_keys = a.take(shard_buffers.0 * 4);
        layout.shard_sums = a.take(shard_buffers.1 * 8);
        layout.total_bytes = a.next;
        layout
    }
}

/// The host image of the constants every run reads (statistics, frequencies, per-sequence
/// lengths and candidate ranges, keep-set indices); the address tables stay zero until a cache
/// is bound ([`RoundPlan::workspace_image`]).
fn constants_image(
    scorer: &Scorer,
    config: &CompressionConfig,
    layout: &WorkspaceLayout,
    protections: &[crate::policy::Protection],
    n: usize,
) -> Result<Vec<u8>> {
    let m = &scorer.model;
    let (l, h, hkv, f) = (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim / 2);
    let stats = &scorer.stats;
    let want = l * h * f;
    for (name, t) in
        [("q_mean_real", &stats.q_mean_real), ("q_mean_imag", &stats.q_mean_imag), ("q_abs_mean", &stats.q_abs_mean)]
    {
        if t.len() != want {
            return Err(Error::shape(name, format!("{want} values [L, H, F]"), t.len()));
        }
    }
    if scorer.omega.len() != f {
        return Err(Error::shape("omega", format!("{f} frequencies (head_dim / 2)"), scorer.omega.len()));
    }
    let mut constants = vec![0u8; layout.constants_bytes];
    push_bytes(&mut constants, layout.q_mean_real, &f32_bytes(&stats.q_mean_real));
    push_bytes(&mut constants, layout.q_mean_imag, &f32_bytes(&stats.q_mean_imag));
    push_bytes(&mut constants, layout.q_abs_mean, &f32_bytes(&stats.q_abs_mean));
    let omega: Vec<u8> = scorer.omega.iter().flat_map(|x| x.to_le_bytes()).collect();
    push_bytes(&mut constants, layout.omega, &omega);
    // i32 [S] each: slots, first and one-past-last z-score candidate, protected prompt.
    let candidates = |p: &crate::policy::Protection| match config.preset {
        Preset::Paper => (p.prefix, p.window_start.max(p.prefix)),
        Preset::Vllm => (0, n),
    };
    let lengths: Vec<u8> = std::iter::repeat_n(n as i32, protections.len())
        .chain(protections.iter().map(|p| candidates(p).0 as i32))
        .chain(protections.iter().map(|p| candidates(p).1 as i32))
        .chain(protections.iter().map(|p| p.prefix as i32))
        .flat_map(|x| x.to_le_bytes())
        .collect();
    push_bytes(&mut constants, layout.lengths, &lengths);
    let set_index: Vec<u8> = (0..l)
        .flat_map(|layer| (0..hkv).map(move |g| config.mode.set_index(layer, g, hkv) as i32))
        .flat_map(|x| x.to_le_bytes())
        .collect();
    push_bytes(&mut constants, layout.set_index, &set_index);
    Ok(constants)
}

impl RoundPlan {
    /// Plan a round of `config` over a cache of `shape` for `scorer`'s model and statistics.
    ///
    /// # Errors
    /// `InvalidArgument` for a bad configuration or a shape a stage refuses (naming the field);
    /// `Unsupported` for a head_dim or dtype with no compiled kernel.
    pub fn new(scorer: &Scorer, config: &CompressionConfig, shape: RoundShape) -> Result<Self> {
        Self::new_batch(scorer, config, shape, &[shape.prefix_len])
    }

    /// [`Self::new`] with the variants `dispatch` picks (tuning tables over the built-in rule).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn tuned(scorer: &Scorer, config: &CompressionConfig, shape: RoundShape, dispatch: &Dispatch) -> Result<Self> {
        Self::new_batch_tuned(scorer, config, shape, &[shape.prefix_len], dispatch)
    }

    /// Plan one round for many sequences that share `shape` (slots N, budget, layout,
    /// compaction) but each have their own prompt length (`prefix_lens[s]`, which replaces
    /// `shape.prefix_len`) and `round_start`: one launch per stage for all of them. Tables hold
    /// `S * L` addresses, sequence-major (a paged cache: its `L` pools, and a block table
    /// `i32[S, max_blocks]` of blocks distinct across the batch); `round_start` is `i64[S]`; the
    /// outputs of sequence `s` are at [`Self::read_outputs_of`].
    ///
    /// # Errors
    /// As [`Self::new`]; `InvalidArgument` for no sequence, more than 65535, or (with more than
    /// one) a sequence whose protected slots reach the budget (plan it alone: it is skipped).
    pub fn new_batch(
        scorer: &Scorer,
        config: &CompressionConfig,
        shape: RoundShape,
        prefix_lens: &[usize],
    ) -> Result<Self> {
        Self::new_batch_tuned(scorer, config, shape, prefix_lens, &Dispatch::built_in())
    }

    /// [`Self::new_batch`] with the variants `dispatch` picks.
    ///
    /// # Errors
    /// As [`Self::new_batch`].
    pub fn new_batch_tuned(
        scorer: &Scorer,
        config: &CompressionConfig,
        shape: RoundShape,
        prefix_lens: &[usize],
        dispatch: &Dispatch,
    ) -> Result<Self> {
        Self::build(scorer, config, shape, prefix_lens, dispatch, None)
    }

    /// Plan one rank's round of a sharded engine (tensor and pipeline parallelism, see
    /// [`crate::shard`]): `scorer` is the rank's ([`Shard::scorer`]), the cache tables hold the
    /// rank's layers, each tensor its KV heads. When the shard's round needs collectives
    /// ([`Self::reductions`]), it runs in parts ([`Self::run_part`]): after part `k` the engine
    /// all-reduces [`Self::reduction_region`] `k` in place across the reduction's ranks, then
    /// launches part `k + 1`. A shard that needs none runs whole ([`Self::run`]).
    ///
    /// # Errors
    /// As [`Self::new_batch_tuned`]; `ShapeMismatch` when `scorer` is not the shard's.
    pub fn new_shard(
        scorer: &Scorer,
        shard: &Shard,
        config: &CompressionConfig,
        shape: RoundShape,
        prefix_lens: &[usize],
        dispatch: &Dispatch,
    ) -> Result<Self> {
        Self::build(scorer, config, shape, prefix_lens, dispatch, Some(shard))
    }

    fn build(
        scorer: &Scorer,
        config: &CompressionConfig,
        shape: RoundShape,
        prefix_lens: &[usize],
        dispatch: &Dispatch,
        shard: Option<&Shard>,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(shard) = shard {
            shard.check_scorer(scorer)?;
        }
        let m = &scorer.model;
        let (l, h, hkv, d) = (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim);
        let (outcome, protections) = batch_outcome(config, shape.len, prefix_lens)?;
        let seqs = prefix_lens.len();
        let sets = config.mode.num_sets(l, hkv);
        let kept = outcome.kept(shape.len);
        let stages = StageSpecs::new(scorer, config, &shape, seqs, protections[0], kept, dispatch)?;
        let steps = match shard {
            Some(shard) => ShardSteps::new(shard, config, shape.len, seqs, protections[0])?,
            None => None,
        };
        let buffers = steps.as_ref().map_or((0, 0), ShardSteps::buffer_lens);
        let layout = WorkspaceLayout::new(&stages, scorer, &shape, seqs, sets, kept, buffers);
        let constants = constants_image(scorer, config, &layout, &protections, shape.len)?;
        Ok(Self {
            shape: RoundShape { prefix_len: prefix_lens[0], ..shape },
            prefix_lens: prefix_lens.to_vec(),
            seqs,
            num_layers: l,
            num_heads: h,
            num_kv_heads: hkv,
            head_dim: d,
            sets,
            kept,
            outcome,
            stages,
            layout,
            constants,
            shard: shard.map(|s| (s.clone(), steps)),
        })
    }

    /// The shard a sharded plan runs on.
    pub fn shard(&self) -> Option<&Shard> {
        self.shard.as_ref().map(|(s, _)| s)
    }

    /// The collectives between the parts of a sharded plan, in order (empty: the plan runs
    /// whole). Lengths cover every sequence of the plan.
    pub fn reductions(&self) -> &[Reduction] {
        match &self.shard {
            Some((_, Some(steps))) => &steps.reductions,
            _ => &[],
        }
    }

    /// Launch sequences of the plan: one more than its collectives.
    pub fn parts(&self) -> usize {
        self.reductions().len() + 1
    }

    /// Where reduction `k` lives in the workspace: the engine all-reduces
    /// `workspace + region.offset`, [`Reduction::len`] elements of its dtype, in place, after
    /// part `k` and before part `k + 1`.
    ///
    /// # Errors
    /// `InvalidArgument` for `k` past the plan's reductions.
    pub fn reduction_region(&self, k: usize) -> Result<Region> {
        let r = self.reductions().get(k).ok_or_else(|| {
            Error::invalid_argument("reduction", format!("< {} (the plan's collectives)", self.reductions().len()), k)
        })?;
        let base = match r.kind.op() {
            ReduceOp::Max => self.layout.shard_keys,
            ReduceOp::Sum => self.layout.shard_sums,
        };
        Ok(Region { offset: base.offset, bytes: r.bytes() })
    }

    /// The K and V strides of a contiguous plan (`None` when paged).
    pub fn contiguous_strides(&self) -> Option<(RowStrides, RowStrides)> {
        match self.shape.layout {
            CacheLayout::Contiguous { keys, values } => Some((keys, values)),
            CacheLayout::Paged { .. } => None,
        }
    }

    /// The shape planned for.
    pub fn shape(&self) -> &RoundShape {
        &self.shape
    }

    /// What the round does (fixed by the shape).
    pub fn outcome(&self) -> RoundOutcome {
        self.outcome
    }

    /// Keep sets.
    pub fn sets(&self) -> usize {
        self.sets
    }

    /// Slots per keep set: the budget when the round evicts, else N.
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// `(L, H, Hkv, D)`.
    pub fn dims(&self) -> (usize, usize, usize, usize) {
        (self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)
    }

    /// The workspace layout.
    pub fn layout(&self) -> &WorkspaceLayout {
        &self.layout
    }

    /// Bytes of workspace a run needs (base aligned to [`WORKSPACE_ALIGN`]).
    pub fn workspace_bytes(&self) -> usize {
        self.layout.total_bytes
    }

    /// The scoring launch (its variant names the kernel).
    pub fn score_spec(&self) -> &ScoreSpec {
        &self.stages.score
    }

    /// The stages `run` launches, in order.
    pub fn stages(&self) -> Vec<Stage> {
        Stage::ALL
            .into_iter()
            .filter(|s| match s {
                Stage::Normalize => self.stages.normalize.is_some(),
                Stage::Compact => self.stages.compact.is_some(),
                _ => true,
            })
            .collect()
    }

    /// The variants `run` launches, in order.
    pub fn variants(&self) -> Vec<Variant> {
        let mut v = vec![crate::variant::trig_variant(), self.stages.score.variant()];
        v.extend(self.stages.normalize.as_ref().map(NormalizeSpec::variant));
        v.push(self.reduce_variant());
        v.extend(self.stages.select.launches(&SelectAddresses::default()).iter().flatten().map(|l| l.0));
        v.extend(self.stages.compact.as_ref().map(CompactSpec::variant));
        v
    }

    /// The reduce stage's variant: the sharded steps' when the plan has collectives.
    fn reduce_variant(&self) -> Variant {
        match &self.shard {
            Some((_, Some(steps))) => steps.partial.variant(),
            _ => self.stages.reduce.variant(),
        }
    }

    /// The kernel symbol of each stage `run` launches, by stage name.
    pub fn stage_kernels(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (Stage::Weights.name(), crate::variant::trig_variant().symbol()),
            (Stage::Score.name(), self.stages.score.variant().symbol()),
        ];
        if let Some(n) = &self.stages.normalize {
            v.push((Stage::Normalize.name(), n.variant().symbol()));
        }
        v.push((Stage::Reduce.name(), self.reduce_variant().symbol()));
        v.push((Stage::Select.name(), self.stages.select.variant().symbol()));
        if let Some(c) = &self.stages.compact {
            v.push((Stage::Compact.name(), c.variant().symbol()));
        }
        v
    }

    /// Where each stage's variant came from, by stage name (the stages of
    /// [`Self::stage_kernels`]; weights, normalize and reduce have one variant: built-in).
    pub fn stage_sources(&self) -> Vec<(&'static str, ChoiceSource)> {
        let [score, select, compact] = self.stages.sources;
        self.stage_kernels()
            .into_iter()
            .map(|(name, _)| {
                let source = match name {
                    n if n == Stage::Score.name() => score,
                    n if n == Stage::Select.name() => select,
                    n if n == Stage::Compact.name() => compact,
                    _ => ChoiceSource::BuiltIn,
                };
                (name, source)
            })
            .collect()
    }

    /// Bytes of K (and, when compacting, V) the round reads, for bandwidth reports.
    pub fn key_bytes(&self) -> usize {
        self.num_layers * self.num_kv_heads * self.shape.len * self.head_dim * self.shape.dtype.size()
    }

    /// The host image of the workspace's constants (`0..constants_bytes`) for a cache at `cache`:
    /// copy it once to the workspace base before the first run (and again only if the cache
    /// moves).
    ///
    /// # Errors
    /// `ShapeMismatch` when a table does not have one address per layer (destination tables only
    /// out of place).
    pub fn workspace_image(&self, cache: &CacheAddresses) -> Result<Vec<u8>> {
        let full = self.seqs * self.num_layers;
        let count = self.table_len();
        let out_of_place = matches!(self.shape.compaction, Compaction::OutOfPlace { .. });
        let tables: [(&str, &Vec<u64>, bool); 4] = [
            ("K layer addresses", &cache.keys, true),
            ("V layer addresses", &cache.values, self.stages.compact.is_some()),
            ("destination K layer addresses", &cache.keys_out, out_of_place),
            ("destination V layer addresses", &cache.values_out, out_of_place),
        ];
        for (what, t, needed) in tables {
            if !needed {
                continue;
            }
            if t.len() != count {
                return Err(Error::shape(what, count, t.len()));
            }
            if let Some(i) = t.iter().position(|&a| a == 0) {
                return Err(Error::invalid_argument(format!("{what} [{i}]"), "a non-null address", 0));
            }
            for (i, &a) in t.iter().enumerate() {
                check_aligned(format!("{what} [{i}]"), a, ROW_ALIGN)?;
            }
        }
        self.check_run_addresses(cache.block_table, cache.positions, cache.positions_out)?;
        let mut image = self.constants.clone();
        // `S * L` entries, sequence-major; a paged cache's `L` pools are repeated per sequence.
        let table = |t: &Vec<u64>| -> Vec<u8> {
            if t.len() == count {
                t.iter().cycle().take(full).flat_map(|a| a.to_le_bytes()).collect()
            } else {
                vec![0u8; full * 8]
            }
        };
        let (k_out, v_out) =
            if out_of_place { (&cache.keys_out, &cache.values_out) } else { (&cache.keys, &cache.values) };
        push_bytes(&mut image, self.layout.key_table, &table(&cache.keys));
        push_bytes(&mut image, self.layout.value_table, &table(&cache.values));
        push_bytes(&mut image, self.layout.key_out_table, &table(k_out));
        push_bytes(&mut image, self.layout.value_out_table, &table(v_out));
        Ok(image)
    }

    /// Check the addresses a run reads besides the workspace: the block table (present and
    /// 4-byte aligned exactly when paged) and the positions (present and aligned to their type
    /// when the plan compacts them).
    fn check_run_addresses(&self, block_table: u64, positions: u64, positions_out: u64) -> Result<()> {
        let paged = matches!(self.shape.layout, CacheLayout::Paged { .. });
        if paged != (block_table != 0) {
            return Err(Error::invalid_argument(
                "block table address",
                if paged { "non-null (paged cache)" } else { "null (contiguous cache)" },
                format!("{block_table:#x}"),
            ));
        }
        check_aligned("block table address", block_table, 4)?;
        if let (Some(ty), Some(spec)) = (self.shape.positions, &self.stages.compact) {
            let out_of_place = spec.shape().target == CompactTarget::OutOfPlace;
            if positions == 0 || (out_of_place && positions_out == 0) {
                return Err(Error::invalid_argument(
                    "positions address",
                    if out_of_place { "non-null positions and positions_out" } else { "non-null positions" },
                    "null",
                ));
            }
            check_aligned("positions address", positions, ty.size())?;
            check_aligned("positions_out address", positions_out, ty.size())?;
        }
        Ok(())
    }

    /// Sequences of the round.
    pub fn num_seqs(&self) -> usize {
        self.seqs
    }

    /// Each sequence's prompt length (protected under the `paper` preset).
    pub fn prefix_lens(&self) -> &[usize] {
        &self.prefix_lens
    }

    /// Entries of each address table a cache binds: `S * L` (one tensor per sequence and
    /// layer), or `L` pools for a paged cache.
    pub fn table_len(&self) -> usize {
        match self.shape.layout {
            CacheLayout::Contiguous { .. } => self.seqs * self.num_layers,
            CacheLayout::Paged { .. } => self.num_layers,
        }
    }

    /// Read the outputs of a finished one-sequence run from a host copy of the workspace (at
    /// least [`Self::workspace_bytes`] long).
    ///
    /// # Errors
    /// `ShapeMismatch` for a shorter buffer; `InvalidArgument` for a batch (use
    /// [`Self::read_outputs_of`]).
    pub fn read_outputs(&self, workspace: &[u8]) -> Result<RoundOutputs> {
        if self.seqs != 1 {
            return Err(Error::invalid_argument("read_outputs", "a one-sequence plan (read_outputs_of)", self.seqs));
        }
        self.read_outputs_of(workspace, 0)
    }

    /// Read sequence `seq`'s outputs of a finished run from a host copy of the workspace.
    ///
    /// # Errors
    /// `ShapeMismatch` for a shorter buffer; `InvalidArgument` for `seq >= S`.
    pub fn read_outputs_of(&self, workspace: &[u8], seq: usize) -> Result<RoundOutputs> {
        if workspace.len() < self.layout.total_bytes {
            return Err(Error::shape("workspace copy", format!("{} bytes", self.layout.total_bytes), workspace.len()));
        }
        if seq >= self.seqs {
            return Err(Error::invalid_argument("sequence", format!("< {}", self.seqs), seq));
        }
        let (w, n, h, l) = (&self.layout, self.shape.len, self.num_heads, self.num_layers);
        let raw0 = w.raw.offset + seq * l * h * n * 4;
        let sets_bytes = self.sets * self.kept * 4;
        Ok(RoundOutputs {
            raw: (0..l).map(|layer| read_f32(workspace, raw0 + layer * h * n * 4, h * n)).collect(),
            score: read_f32(workspace, w.score.offset + seq * self.sets * n * 4, self.sets * n),
            keep: read_sets(workspace, w.keep.offset + seq * sets_bytes, self.sets, self.kept),
            slot_map: if w.slot_map.bytes > 0 {
                read_sets(workspace, w.slot_map.offset + seq * sets_bytes, self.sets, self.kept)
            } else {
                Vec::new()
            },
        })
    }

    /// Launch every stage of the round on `launcher`: nothing but launches.
    ///
    /// # Errors
    /// `InvalidArgument` for a paged plan without a block table (or a contiguous one with);
    /// what the launcher reports (a failed launch, a kernel the build lacks).
    ///
    /// # Safety
    /// `at.workspace` is [`Self::workspace_bytes`] of memory of the launcher's backend, aligned
    /// to [`WORKSPACE_ALIGN`], whose first `constants_bytes` hold [`Self::workspace_image`] of a
    /// cache that is alive and holds [`RoundShape::len`] slots in the planned layout (and
    /// destination tensors that hold `kept` slots, out of place, not overlapping the source);
    /// `at.round_start` is the address of one `i64` in that memory, at least N; a paged plan's
    /// `at.block_table` is the sequence's block-table row, distinct in-range blocks covering N
    /// slots. Nothing else touches the workspace or the cache until the launches have run.
    pub unsafe fn run<L: Launcher>(&self, launcher: &mut L, at: &RoundAddresses) -> Result<()> {
        if self.parts() > 1 {
            return Err(Error::invalid_argument(
                "run of a sharded plan",
                "a plan without collectives (run_part for each part of this one)",
                format!("{} parts around {} all-reduces", self.parts(), self.reductions().len()),
            ));
        }
        // SAFETY: the caller's contract.
        unsafe { self.run_part(launcher, at, 0) }
    }

    /// Launch part `part` of a sharded plan (see [`Self::new_shard`]): part 0 scores,
    /// normalises and reduces up to the first collective, each later part continues after one;
    /// the last selects and compacts. A plan of one part is [`Self::run`]. Nothing but launches.
    ///
    /// # Errors
    /// As [`Self::run`]; `InvalidArgument` for `part >= parts()`.
    ///
    /// # Safety
    /// As [`Self::run`], for every part in order on the same workspace; between parts `k` and
    /// `k + 1` the engine has all-reduced [`Self::reduction_region`] `k` across the reduction's
    /// ranks (ordered on the launcher's stream) and nothing else touched the workspace.
    pub unsafe fn run_part<L: Launcher>(&self, launcher: &mut L, at: &RoundAddresses, part: usize) -> Result<()> {
        if part >= self.parts() {
            return Err(Error::invalid_argument("part", format!("< {} (the plan's parts)", self.parts()), part));
        }
        let (workspace, round_start) = (at.workspace, at.round_start);
        check_workspace_address(workspace)?;
        if round_start == 0 {
            return Err(Error::invalid_argument("round_start address", "a non-null address", "0x0"));
        }
        check_aligned("round_start address", round_start, 8)?;
        self.check_run_addresses(at.block_table, at.positions, at.positions_out)?;
        let w = &self.layout;
        let lengths = w.lengths.at(workspace);
        let per_seq = 4 * self.seqs as u64; // bytes of one i32 [S] array of `lengths`
        let prefixes = if self.seqs > 1 { lengths + 3 * per_seq } else { 0 };
        let steps = match &self.shard {
            Some((_, Some(steps))) => Some(steps),
            _ => None,
        };
        let shard_at = |z: u64| ReduceShardAddresses {
            z,
            keys: w.shard_keys.at(workspace),
            sums: w.shard_sums.at(workspace),
            out: w.score.at(workspace),
            prefixes,
        };
        // SAFETY (all launches): the caller's contract on the workspace and cache; every region
        // is sized by the same validated spec whose params are built here.
        if part > 0 {
            let steps = steps.expect("parts > 1 only with shard steps");
            // After the group max: its sum over the stage's layers, then (pipeline stages) the
            // layer-sum collective, else straight on.
            if let (1, Some(spec)) = (part, &steps.layer_sum) {
                let p = spec.params(&shard_at(0));
                unsafe { launcher.launch(Stage::Reduce, spec.variant(), &p, spec.grid(), 0)? };
                if steps.reductions.len() > 1 {
                    return Ok(());
                }
            }
            let p = steps.finish.params(&shard_at(0));
            unsafe { launcher.launch(Stage::Reduce, steps.finish.variant(), &p, steps.finish.grid(), 0)? };
            return unsafe { self.launch_select_compact(launcher, at, prefixes) };
        }
        let trig = self.stages.trig.params(&TrigAddresses {
            q_mean_real: w.q_mean_real.at(workspace),
            q_mean_imag: w.q_mean_imag.at(workspace),
            q_abs_mean: w.q_abs_mean.at(workspace),
            omega: w.omega.at(workspace),
            round_start,
            weights: if self.stages.trig.vectors > 0 { w.weights.at(workspace) } else { 0 },
            norm: w.norm.at(workspace),
        });
        // SAFETY (all launches): the caller's contract on the workspace and cache; every region
        // is sized by the same validated spec whose params are built here.
        unsafe { launcher.launch(Stage::Weights, crate::variant::trig_variant(), &trig, self.stages.trig.grid(), 0)? };
        let score = self.stages.score.params(&ScoreAddresses {
            keys: w.key_table.at(workspace),
            weights: if self.stages.trig.vectors > 0 { w.weights.at(workspace) } else { 0 },
            norm: w.norm.at(workspace),
            block_table: at.block_table,
            seq_lens: lengths,
            stat_start: lengths + per_seq,
            stat_end: lengths + 2 * per_seq,
            raw: w.raw.at(workspace),
            partials: w.partials.at(workspace),
        });
        unsafe {
            launcher.launch(
                Stage::Score,
                self.stages.score.variant(),
                &score,
                self.stages.score.grid(),
                self.stages.score.dynamic_smem_bytes(),
            )?
        };
        let reduce_input = match &self.stages.normalize {
            Some(spec) => {
                let p = spec.params(&NormalizeAddresses {
                    partials: w.partials.at(workspace),
                    raw: w.raw.at(workspace),
                    out: w.z.at(workspace),
                });
                unsafe { launcher.launch(Stage::Normalize, spec.variant(), &p, spec.grid(), 0)? };
                w.z.at(workspace)
            }
            None => w.raw.at(workspace),
        };
        if let Some(steps) = steps {
            let p = steps.partial.params(&shard_at(reduce_input));
            return unsafe { launcher.launch(Stage::Reduce, steps.partial.variant(), &p, steps.partial.grid(), 0) };
        }
        let reduce =
            self.stages.reduce.params(&ReduceAddresses { z: reduce_input, out: w.score.at(workspace), prefixes });
        unsafe { launcher.launch(Stage::Reduce, self.stages.reduce.variant(), &reduce, self.stages.reduce.grid(), 0)? };
        unsafe { self.launch_select_compact(launcher, at, prefixes) }
    }

    /// The last stages of a run: select, then compact.
    ///
    /// # Safety
    /// As [`Self::run_part`], with the score rows in the workspace.
    unsafe fn launch_select_compact<L: Launcher>(
        &self,
        launcher: &mut L,
        at: &RoundAddresses,
        prefixes: u64,
    ) -> Result<()> {
        let (w, workspace) = (&self.layout, at.workspace);
        let select = SelectAddresses {
            scores: w.score.at(workspace),
            keep: w.keep.at(workspace),
            scratch: w.select_scratch.at(workspace),
            prefixes,
        };
        for (variant, params, grid) in self.stages.select.launches(&select).iter().flatten() {
            unsafe { launcher.launch(Stage::Select, *variant, params, *grid, 0)? };
        }
        if let Some(spec) = &self.stages.compact {
            let p = spec.params(&CompactAddresses {
                k_src: w.key_table.at(workspace),
                k_dst: w.key_out_table.at(workspace),
                v_src: w.value_table.at(workspace),
                v_dst: w.value_out_table.at(workspace),
                keep: w.keep.at(workspace),
                set_index: w.set_index.at(workspace),
                block_table: at.block_table,
                slot_map: w.slot_map.at(workspace),
                pos_src: at.positions,
                pos_dst: if spec.shape().target == CompactTarget::InPlace { at.positions } else { at.positions_out },
            });
            unsafe { launcher.launch(Stage::Compact, spec.variant(), &p, spec.grid(), 0)? };
        }
        Ok(())
    }
}
