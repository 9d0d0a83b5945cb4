//! C-visible types of the ABI. Field order is ABI; names are the C names.

use crate::error::{Error, Result};
use crate::policy::{CompressionConfig, GroupAggregation, Normalization, PrefixProtection, Preset, SelectionMode};
use crate::score::{NormTerm, OffsetAggregation, ScoreConfig, TrigTerm};
use crate::DType;

/// Major version.
pub const TRIATTN_VERSION_MAJOR: u32 = 0;
/// Minor version.
pub const TRIATTN_VERSION_MINOR: u32 = 2;
/// Patch version.
pub const TRIATTN_VERSION_PATCH: u32 = 0;

/// Result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_status {
    /// Success.
    Ok = 0,
    /// An argument is outside its documented range (or a required pointer is null).
    InvalidArgument = 1,
    /// A model config.json is malformed or unsupported.
    InvalidConfig = 2,
    /// A file is malformed (truncated, garbage, missing tensor).
    InvalidFormat = 3,
    /// Shapes or dtypes do not fit.
    ShapeMismatch = 4,
    /// Valid but not supported by this build.
    Unsupported = 5,
    /// A file could not be read or written.
    Io = 6,
    /// No CUDA driver or device.
    NoDevice = 7,
    /// Built without kernels.
    KernelsUnavailable = 8,
    /// A CUDA driver call failed.
    Driver = 9,
    /// A bug: a panic was caught at the boundary.
    Panic = 10,
}

/// Backend of a context.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_backend {
    /// The CPU backend.
    Cpu = 0,
    /// A CUDA device.
    Cuda = 1,
    /// The CUDA kernels run on the CPU by the library's SIMT layer (a build with the `emu`
    /// feature): device rounds take host addresses where a GPU takes device addresses, streams
    /// are ignored and every call runs synchronously. Slow; for testing an engine's integration
    /// (plans, bindings, workspaces, paged caches) on a machine without a GPU.
    Emu = 2,
}

/// Semantics preset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_preset {
    /// The paper's runner (default).
    Paper = 0,
    /// The official vLLM plugin.
    Vllm = 1,
}

/// Decode a C enum value, with an error naming `what` and the accepted values.
fn decode<T: Copy>(what: &str, v: u32, values: &[(u32, &str, T)]) -> Result<T> {
    values.iter().find(|(n, _, _)| *n == v).map(|&(_, _, t)| t).ok_or_else(|| {
        let expected: Vec<String> = values.iter().map(|(n, name, _)| format!("{name} ({n})")).collect();
        Error::invalid_argument(what, expected.join(" or "), v)
    })
}

impl triattn_backend {
    pub(crate) fn from_c(what: &str, v: u32) -> Result<Self> {
        decode(
            what,
            v,
            &[
                (0, "TRIATTN_BACKEND_CPU", Self::Cpu),
                (1, "TRIATTN_BACKEND_CUDA", Self::Cuda),
                (2, "TRIATTN_BACKEND_EMU", Self::Emu),
            ],
        )
    }
}

impl triattn_mode {
    fn from_c(what: &str, v: u32) -> Result<Self> {
        decode(
            what,
            v,
            &[
                (0, "TRIATTN_MODE_PER_HEAD", Self::PerHead),
                (1, "TRIATTN_MODE_PER_LAYER_PER_HEAD", Self::PerLayerPerHead),
                (2, "TRIATTN_MODE_UNION", Self::Union),
            ],
        )
    }
}

impl triattn_aggregation {
    fn from_c(what: &str, v: u32) -> Result<Self> {
        decode(what, v, &[(0, "TRIATTN_AGGREGATION_MEAN", Self::Mean), (1, "TRIATTN_AGGREGATION_MAX", Self::Max)])
    }
}

impl triattn_preset {
    pub(crate) fn from_c(what: &str, v: u32) -> Result<Self> {
        decode(what, v, &[(0, "TRIATTN_PRESET_PAPER", Self::Paper), (1, "TRIATTN_PRESET_VLLM", Self::Vllm)])
    }

    pub(crate) fn to_rust(self) -> Preset {
        match self {
            triattn_preset::Paper => Preset::Paper,
            triattn_preset::Vllm => Preset::Vllm,
        }
    }
}

/// Selection mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_mode {
    /// One set per KV head for all layers.
    PerHead = 0,
    /// One set per (layer, KV head).
    PerLayerPerHead = 1,
    /// One set for everything.
    Union = 2,
}

/// Mean or max (offsets; groups in per-layer-per-head mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_aggregation {
    /// Mean.
    Mean = 0,
    /// Max.
    Max = 1,
}

/// Key and value element type.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_dtype {
    /// f32.
    F32 = 0,
    /// IEEE f16.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
}

impl triattn_dtype {
    pub(crate) fn from_c(what: &str, v: u32) -> Result<Self> {
        decode(
            what,
            v,
            &[
                (0, "TRIATTN_DTYPE_F32", Self::F32),
                (1, "TRIATTN_DTYPE_F16", Self::F16),
                (2, "TRIATTN_DTYPE_BF16", Self::Bf16),
            ],
        )
    }

    pub(crate) fn to_rust(self) -> DType {
        match self {
            triattn_dtype::F32 => DType::F32,
            triattn_dtype::F16 => DType::F16,
            triattn_dtype::Bf16 => DType::Bf16,
        }
    }
}

/// What a round did.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_outcome {
    /// Each set now holds `budget` slots.
    Compressed = 0,
    /// The cache held no more than the budget; every slot kept.
    WithinBudget = 1,
    /// The protected slots alone reach the budget; round skipped, every slot kept
    /// (`triattn_last_error` says why).
    SkippedProtectedReachBudget = 2,
}

/// Every knob of a round; fill with `triattn_config_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_config {
    /// `sizeof(triattn_config)`, written by `triattn_config_default`: the ABI version of this struct (checked on entry).
    pub struct_size: u32,
    /// Semantics: a `triattn_preset` value (C enums travel as uint32_t and are checked on entry).
    pub preset: u32,
    /// Selection mode: a `triattn_mode` value.
    pub mode: u32,
    /// Aggregation over offsets: a `triattn_aggregation` value.
    pub offsets_aggregation: u32,
    /// Group reduction (per-layer-per-head): a `triattn_aggregation` value.
    pub group_aggregation: u32,
    /// Slots kept per set, protected included.
    pub budget: usize,
    /// Slack above the budget before a round.
    pub divide_length: usize,
    /// Recent slots always kept.
    pub window: usize,
    /// Largest geometric offset.
    pub offset_max_length: u64,
    /// 1: z-score rows; 0: rank raw scores.
    pub normalize: i32,
    /// 1: always keep the prompt.
    pub protect_prefix: i32,
    /// 1: norm coefficient `a` instead of `a - |q̄|`.
    pub disable_mlr: i32,
    /// 1: norm term only.
    pub disable_trig: i32,
}

fn flag(what: &str, v: i32) -> Result<bool> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(Error::invalid_argument(what, "0 or 1", other)),
    }
}

impl triattn_config {
    pub(crate) fn from_rust(c: &CompressionConfig) -> Self {
        let agg = |a: OffsetAggregation| match a {
            OffsetAggregation::Mean => triattn_aggregation::Mean,
            OffsetAggregation::Max => triattn_aggregation::Max,
        };
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            preset: match c.preset {
                Preset::Paper => triattn_preset::Paper,
                Preset::Vllm => triattn_preset::Vllm,
            } as u32,
            mode: match c.mode {
                SelectionMode::PerHead => triattn_mode::PerHead,
                SelectionMode::PerLayerPerHead => triattn_mode::PerLayerPerHead,
                SelectionMode::Union => triattn_mode::Union,
            } as u32,
            offsets_aggregation: agg(c.score.aggregation) as u32,
            group_aggregation: match c.group_aggregation {
                GroupAggregation::Max => triattn_aggregation::Max,
                GroupAggregation::Mean => triattn_aggregation::Mean,
            } as u32,
            budget: c.budget,
            divide_length: c.divide_length,
            window: c.window,
            offset_max_length: c.score.offset_max_length,
            normalize: (c.normalization == Normalization::ZScore) as i32,
            protect_prefix: (c.prefix == PrefixProtection::Protected) as i32,
            disable_mlr: (c.score.norm == NormTerm::MeanModulus) as i32,
            disable_trig: (c.score.trig == TrigTerm::Excluded) as i32,
        }
    }

    pub(crate) fn to_rust(self) -> Result<CompressionConfig> {
        Ok(CompressionConfig {
            preset: triattn_preset::from_c("config.preset", self.preset)?.to_rust(),
            budget: self.budget,
            divide_length: self.divide_length,
            mode: match triattn_mode::from_c("config.mode", self.mode)? {
                triattn_mode::PerHead => SelectionMode::PerHead,
                triattn_mode::PerLayerPerHead => SelectionMode::PerLayerPerHead,
                triattn_mode::Union => SelectionMode::Union,
            },
            score: ScoreConfig {
                offset_max_length: self.offset_max_length,
                aggregation: match triattn_aggregation::from_c("config.offsets_aggregation", self.offsets_aggregation)?
                {
                    triattn_aggregation::Mean => OffsetAggregation::Mean,
                    triattn_aggregation::Max => OffsetAggregation::Max,
                },
                norm: if flag("config.disable_mlr", self.disable_mlr)? {
                    NormTerm::MeanModulus
                } else {
                    NormTerm::MeanResidual
                },
                trig: if flag("config.disable_trig", self.disable_trig)? {
                    TrigTerm::Excluded
                } else {
                    TrigTerm::Included
                },
            },
            group_aggregation: match triattn_aggregation::from_c("config.group_aggregation", self.group_aggregation)? {
                triattn_aggregation::Max => GroupAggregation::Max,
                triattn_aggregation::Mean => GroupAggregation::Mean,
            },
            window: self.window,
            normalization: if flag("config.normalize", self.normalize)? {
                Normalization::ZScore
            } else {
                Normalization::Off
            },
            prefix: if flag("config.protect_prefix", self.protect_prefix)? {
                PrefixProtection::Protected
            } else {
                PrefixProtection::Unprotected
            },
        })
    }
}

/// Model shape seen by a compressor.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_shape {
    /// `sizeof(triattn_shape)`, set by the caller before the call: the ABI version of this struct (checked on entry).
    pub struct_size: u32,
    /// Layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Keep sets a round produces (KV heads, layers x KV heads, or 1).
    pub num_keep_sets: usize,
}

/// Arguments of a round on host buffers.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_host_round {
    /// `sizeof(triattn_host_round)`, set by the caller: the ABI version of this struct (checked on entry).
    pub struct_size: u32,
    /// Element type of the keys: a `triattn_dtype` value.
    pub dtype: u32,
    /// `num_layers` pointers, each to `[num_kv_heads, n, head_dim]` contiguous keys.
    pub keys: *const *const std::ffi::c_void,
    /// Cached slots per (layer, KV head).
    pub n: usize,
    /// Tokens seen so far (>= n).
    pub round_start: u64,
    /// Prompt slots at the front of the cache.
    pub prefix_len: usize,
    /// Output: `num_keep_sets` rows of kept slot indices, `keep_row_stride` apart.
    pub keep: *mut i32,
    /// Elements between keep rows (>= min(budget, n)).
    pub keep_row_stride: usize,
    /// Optional output (may be NULL): `num_keep_sets x n` reduced scores.
    pub score: *mut f32,
}

/// What a device round does after selection (`triattn_round_shape::compaction`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_compaction {
    /// No compaction: the round ends with its keep sets (virtual eviction, or the engine moves
    /// the rows itself).
    KeepSetsOnly = 0,
    /// Compact K and V in place, order-preserving (row `i` receives row `keep[i]`).
    InPlaceOrderPreserving = 1,
    /// Compact K and V in place, hole-filling (moves at most the evicted count).
    InPlaceHoleFilling = 2,
    /// Copy the kept rows, in slot order, into separate destination tensors.
    OutOfPlace = 3,
}

impl triattn_compaction {
    pub(crate) fn from_c(what: &str, v: u32) -> Result<Self> {
        decode(
            what,
            v,
            &[
                (0, "TRIATTN_COMPACTION_KEEP_SETS_ONLY", Self::KeepSetsOnly),
                (1, "TRIATTN_COMPACTION_IN_PLACE_ORDER_PRESERVING", Self::InPlaceOrderPreserving),
                (2, "TRIATTN_COMPACTION_IN_PLACE_HOLE_FILLING", Self::InPlaceHoleFilling),
                (3, "TRIATTN_COMPACTION_OUT_OF_PLACE", Self::OutOfPlace),
            ],
        )
    }
}

/// Element type of the positions a device round compacts alongside the rows
/// (`triattn_round_shape::positions`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_positions {
    /// No positions.
    None = 0,
    /// int32 positions.
    I32 = 1,
    /// int64 positions.
    I64 = 2,
}

impl triattn_positions {
    pub(crate) fn from_c(what: &str, v: u32) -> Result<Self> {
        decode(
            what,
            v,
            &[
                (0, "TRIATTN_POSITIONS_NONE", Self::None),
                (1, "TRIATTN_POSITIONS_I32", Self::I32),
                (2, "TRIATTN_POSITIONS_I64", Self::I64),
            ],
        )
    }
}

/// How a device round's cache is laid out (`triattn_round_shape::layout`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum triattn_layout {
    /// Per layer one K and one V tensor with element strides (the `*_stride` fields).
    Contiguous = 0,
    /// Per layer one K and one V block pool `[num_blocks, block_size, Hkv, dim]` (vLLM) and the
    /// sequence's block-table row (`triattn_cache_pointers::block_table`).
    PagedNhd = 1,
    /// Per layer one K and one V block pool `[num_blocks, Hkv, block_size, dim]` (FlashInfer).
    PagedHnd = 2,
}

impl triattn_layout {
    pub(crate) fn from_c(what: &str, v: u32) -> Result<Self> {
        decode(
            what,
            v,
            &[
                (0, "TRIATTN_LAYOUT_CONTIGUOUS", Self::Contiguous),
                (1, "TRIATTN_LAYOUT_PAGED_NHD", Self::PagedNhd),
                (2, "TRIATTN_LAYOUT_PAGED_HND", Self::PagedHnd),
            ],
        )
    }
}

/// The cache a device round runs over. Contiguous: per layer one `K[num_kv_heads, len,
/// head_dim]` and one `V[num_kv_heads, len, value_dim]` tensor with the given element strides
/// (any layout whose rows are 16-byte aligned: `[Hkv, N, D]`, or `[N, Hkv, D]` with head stride D
/// and row stride Hkv*D). Paged: per layer one K and one V block pool and the sequence's
/// block-table row (the stride fields are ignored). Enum fields travel as uint32_t and are
/// checked on entry.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_round_shape {
    /// `sizeof(triattn_round_shape)`, set by the caller: the ABI version of this struct (checked on entry).
    pub struct_size: u32,
    /// Element type of K and V: a `triattn_dtype` value.
    pub dtype: u32,
    /// Cached slots N per (layer, KV head), >= 1.
    pub len: usize,
    /// Prompt slots at the front of the cache (<= len).
    pub prefix_len: usize,
    /// Elements per V row (Dv); read only when the round compacts.
    pub value_dim: usize,
    /// Elements between KV heads of K.
    pub key_head_stride: usize,
    /// Elements between slots of K (>= head_dim).
    pub key_row_stride: usize,
    /// Elements between KV heads of V (read only when the round compacts).
    pub value_head_stride: usize,
    /// Elements between slots of V (>= value_dim; read only when the round compacts).
    pub value_row_stride: usize,
    /// What happens after selection: a `triattn_compaction` value.
    pub compaction: u32,
    /// Out of place: elements between KV heads of the destination K (else ignored).
    pub dst_key_head_stride: usize,
    /// Out of place: elements between slots of the destination K (>= head_dim).
    pub dst_key_row_stride: usize,
    /// Out of place: elements between KV heads of the destination V.
    pub dst_value_head_stride: usize,
    /// Out of place: elements between slots of the destination V (>= value_dim).
    pub dst_value_row_stride: usize,
    /// Where the rows live: a `triattn_layout` value (0, contiguous, when zero-initialised).
    pub layout: u32,
    /// Paged: slots per block, 16 to 256 (else ignored).
    pub block_size: usize,
    /// Paged: blocks in each layer's pool.
    pub num_blocks: usize,
    /// Paged: entries of the sequence's block-table row (>= ceil(len / block_size)).
    pub max_blocks: usize,
    /// Positions compacted alongside the rows: a `triattn_positions` value (0, none, when
    /// zero-initialised); `[sets, len]` at `triattn_cache_pointers::positions`.
    pub positions: u32,
}

/// What a plan needs and where a run leaves its outputs: byte offsets from the workspace base,
/// so an engine can read them on the device (after `triattn_plan_run`, in stream order).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_plan_info {
    /// `sizeof(triattn_plan_info)`, set by the caller before the call: the ABI version of this struct (checked on entry).
    pub struct_size: u32,
    /// Bytes of device workspace the caller provides.
    pub workspace_bytes: usize,
    /// Required alignment of the workspace base (256).
    pub workspace_alignment: usize,
    /// Leading bytes of the workspace `triattn_plan_bind` writes (the per-cache constants).
    pub constants_bytes: usize,
    /// What every round of this shape does (the shape fixes it).
    pub outcome: triattn_outcome,
    /// Keep sets a round produces.
    pub sets: usize,
    /// Slots per keep set: the budget when the round evicts, else `len`.
    pub kept: usize,
    /// Sequences of the round (1, or `num_seqs` of `triattn_plan_create_batch`); every output
    /// below holds them one after another.
    pub num_seqs: usize,
    /// Offset of the keep sets: int32 `[num_seqs, sets, kept]`, ascending slot indices.
    pub keep_offset: usize,
    /// Bytes of the keep sets (`sets * kept * 4`).
    pub keep_bytes: usize,
    /// Offset of the ranked scores: float `[num_seqs, sets, len]` (protected slots +inf).
    pub score_offset: usize,
    /// Bytes of the ranked scores.
    pub score_bytes: usize,
    /// Offset of the raw scores: float `[num_seqs, num_layers, num_heads, len]`.
    pub raw_offset: usize,
    /// Bytes of the raw scores.
    pub raw_bytes: usize,
    /// Offset of the slot map: int32 `[num_seqs, sets, kept]`, the original slot each slot holds after a
    /// compaction.
    pub slot_map_offset: usize,
    /// Bytes of the slot map (0 when the round does not compact).
    pub slot_map_bytes: usize,
}

/// Host arrays of `num_layers` device addresses each (`num_seqs * num_layers`, sequence-major, for a
/// contiguous batch plan): the cache a plan's workspace is bound to.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct triattn_cache_pointers {
    /// `sizeof(triattn_cache_pointers)`, set by the caller: the ABI version of this struct (checked on entry).
    pub struct_size: u32,
    /// K tensor of each layer (always required).
    pub keys: *const *mut std::ffi::c_void,
    /// V tensor of each layer (required when the round compacts, else may be NULL).
    pub values: *const *mut std::ffi::c_void,
    /// Out of place: destination K tensor of each layer (else NULL).
    pub keys_out: *const *mut std::ffi::c_void,
    /// Out of place: destination V tensor of each layer (else NULL).
    pub values_out: *const *mut std::ffi::c_void,
    /// Paged: the device address of the sequence's block-table row, int32 `[max_blocks]`
    /// (distinct blocks; its entries are read at every run, so the engine may append blocks
    /// between rounds). NULL for a contiguous cache.
    pub block_table: *const i32,
    /// With `triattn_round_shape::positions`: the device address of the positions `[sets, len]`
    /// (the position each slot holds, per keep set), rewritten in place to the kept slots'
    /// positions when the round compacts in place; else NULL.
    pub positions: *mut std::ffi::c_void,
    /// Out of place with positions: the device address of the kept positions `[sets, kept]`.
    pub positions_out: *mut std::ffi::c_void,
}

impl Default for triattn_round_shape {
    /// Every field zero (contiguous layout, no positions, keep sets only, f32) but `struct_size`.
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            dtype: 0,
            len: 0,
            prefix_len: 0,
            value_dim: 0,
            key_head_stride: 0,
            key_row_stride: 0,
            value_head_stride: 0,
            value_row_stride: 0,
            compaction: 0,
            dst_key_head_stride: 0,
            dst_key_row_stride: 0,
            dst_value_head_stride: 0,
            dst_value_row_stride: 0,
            layout: 0,
            block_size: 0,
            num_blocks: 0,
            max_blocks: 0,
            positions: 0,
        }
    }
}

impl Default for triattn_cache_pointers {
    /// Every pointer null but `struct_size`.
    fn default() -> Self {
        Self {
            struct_size: std::mem::size_of::<Self>() as u32,
            keys: std::ptr::null(),
            values: std::ptr::null(),
            keys_out: std::ptr::null(),
            values_out: std::ptr::null(),
            block_table: std::ptr::null(),
            positions: std::ptr::null_mut(),
            positions_out: std::ptr::null_mut(),
        }
    }
}

/// A struct the caller versions with a leading `uint32_t struct_size`.
///
/// # Safety
/// Implementors are `#[repr(C)]` with `struct_size: u32` as their first field.
pub(crate) unsafe trait Versioned: Copy {
    /// The C name, for messages.
    const NAME: &'static str;
}

macro_rules! versioned {
    ($($t:ident),*) => {$(
        // SAFETY: `#[repr(C)]` with `struct_size: u32` first (see the definition above).
        unsafe impl Versioned for $t {
            const NAME: &'static str = stringify!($t);
        }
    )*};
}
versioned!(
    triattn_config,
    triattn_shape,
    triattn_host_round,
    triattn_round_shape,
    triattn_plan_info,
    triattn_cache_pointers
);

/// Check the `struct_size` at `p` against this library's `sizeof(T)`.
///
/// # Safety
/// `p` is non-null and points to at least 4 readable bytes (the caller's `struct_size`).
unsafe fn check_size<T: Versioned>(what: &str, p: *const T) -> Result<()> {
    // SAFETY: the caller's contract: the first field, a u32, is readable.
    let got = unsafe { p.cast::<u32>().read_unaligned() };
    let want = std::mem::size_of::<T>();
    if got as usize != want {
        return Err(Error::invalid_argument(
            format!("{what}.struct_size"),
            format!(
                "sizeof({}) = {want} of triattn {}.{}.{} (set it to sizeof({}) from this library's header)",
                T::NAME,
                TRIATTN_VERSION_MAJOR,
                TRIATTN_VERSION_MINOR,
                TRIATTN_VERSION_PATCH,
                T::NAME
            ),
            got,
        ));
    }
    Ok(())
}

/// Read a versioned input struct after checking its `struct_size`.
///
/// # Safety
/// `p` is non-null and points to a `T` of the caller's header version (at least its
/// `struct_size` is readable; the rest is read only when the size matches).
pub(crate) unsafe fn read_versioned<T: Versioned>(what: &str, p: *const T) -> Result<T> {
    // SAFETY: forwarded; a matching size means a whole `T` is readable.
    unsafe {
        check_size(what, p)?;
        Ok(p.read())
    }
}

/// Write a versioned output struct whose `struct_size` the caller set, after checking it.
///
/// # Safety
/// `p` is non-null and points to a writable `T` of the caller's header version whose
/// `struct_size` is initialised.
pub(crate) unsafe fn write_versioned<T: Versioned>(what: &str, p: *mut T, value: T) -> Result<()> {
    // SAFETY: forwarded; a matching size means a whole `T` is writable.
    unsafe {
        check_size(what, p)?;
        p.write(value);
    }
    Ok(())
}
