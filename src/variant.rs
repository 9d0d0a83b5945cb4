//! The single table of compiled kernel variants, and the report of what ptxas made of them.
//!
//! Every kernel that exists is a row of [`table`]: `build.rs` includes this file (it uses only
//! `std` and the crate's [`DType`]; serde only under `cfg(triattn_crate)`, which build.rs sets for
//! the crate, not for itself) to write the instantiation units for nvcc and for the emu
//! backend, and the launchers look variants up here. Compile-time knobs are only those that
//! change code shape — key dtype, head_dim, aggregation kernel, keys per block, threads; pairing
//! style, cache layout, group size and all counts are run-time parameters.
//!
//! Symbols: `triattn_<op>_<dtype>_<knobs>`, knobs in the order `d` (head_dim), `a` (algorithm:
//! `mean`, `max`, `trig`; compact: `order`, `hole`), `bn` (keys per block), `c` (16-byte chunks
//! per thread per tile), `nt` (threads per block), e.g. `triattn_score_bf16_d128_amean_bn96_nt256`,
//! `triattn_compact_bytes_ahole_c4_nt256` (dtype `bytes`: compaction copies bytes, any dtype).

use super::DType;

/// Head dimensions with compiled scoring kernels.
pub const HEAD_DIMS: [usize; 5] = [32, 64, 96, 128, 256];

/// Most weight vectors per head the max-aggregation kernel takes (offsets J, so
/// `offset_max_length < 2^32`).
pub const MAX_VECTORS: usize = 32;

/// Query heads whose mean-mode weights sit in shared memory at once (`SCORE_HEAD_CHUNK`).
const SCORE_HEAD_CHUNK: usize = 8;

/// Which scoring algorithm a variant runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScoreAlgo {
    /// Folded mean over offsets (and the trig-free score): a streaming GEMV on CUDA cores.
    Mean,
    /// Max over offsets: a skinny GEMM on tensor cores (`mma.sync`, bf16 hi + lo).
    Max,
}

impl ScoreAlgo {
    /// `mean` or `max`.
    pub const fn tag(self) -> &'static str {
        match self {
            ScoreAlgo::Mean => "mean",
            ScoreAlgo::Max => "max",
        }
    }
}

/// The compile-time shape of one kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `score`: raw per-head scores of every key (cuda/score/score.cuh).
    Score {
        /// Key dtype.
        dtype: DType,
        /// Head dimension D.
        head_dim: usize,
        /// Mean (GEMV) or max (tensor cores).
        algo: ScoreAlgo,
        /// Key slots per block (one tile).
        block_keys: usize,
        /// Threads per block.
        threads: usize,
    },
    /// `score` (trig): the round's weights with f64 trigonometry (cuda/score/trig.cuh).
    Trig {
        /// Threads per block.
        threads: usize,
    },
    /// `select`: deterministic top-k of every row, one block per row (cuda/select/select.cuh).
    Select {
        /// Threads per block.
        threads: usize,
    },
    /// `select`, multi-block path for long rows: one kernel of its launch sequence
    /// (cuda/select/multi.cuh).
    SelectPass {
        /// Which kernel of the sequence.
        phase: SelectPhase,
        /// Threads per block.
        threads: usize,
    },
    /// `reduce`: per-(layer, head) rows to selection rows, +inf guards (cuda/reduce/reduce.cuh).
    Reduce {
        /// Threads per block.
        threads: usize,
    },
    /// `reduce` of a sharded round, one step around the engine's all-reduce
    /// (cuda/reduce/shard.cuh).
    ReduceShard {
        /// Threads per block.
        threads: usize,
    },
    /// `normalize`: z-score rows from the scorer's tile partials (cuda/normalize/normalize.cuh).
    Normalize {
        /// Threads per block.
        threads: usize,
    },
    /// `compact`: K and V rows of all layers and KV heads moved after selection, byte copies
    /// (cuda/compact/compact.cuh).
    Compact {
        /// Order-preserving or hole-filling.
        mode: CompactMode,
        /// Threads per block.
        threads: usize,
        /// 16-byte chunks each thread stages per tile.
        chunks: usize,
    },
    /// `decode`: T decode queries per head against each KV head's slot list, split-KV
    /// (cuda/decode/decode.cuh).
    Decode {
        /// K/V dtype.
        dtype: DType,
        /// Head dimension D of q and K.
        head_dim: usize,
        /// Query rows (of a KV head's group) per block.
        rows: usize,
        /// Threads per block, also the list entries per tile.
        threads: usize,
    },
    /// `decode` combine: the splits' parts merged into o and lse (cuda/decode/combine.cuh).
    DecodeCombine {
        /// Threads per block.
        threads: usize,
    },
    /// `calibrate`: one layer's pre-RoPE queries added to f64 sums (cuda/calibrate/calibrate.cuh).
    Calibrate {
        /// Query dtype.
        dtype: DType,
        /// Threads per block.
        threads: usize,
    },
}

/// The kernels of the multi-block `select` path, in launch order (cuda/select/multi.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelectPhase {
    /// Per-chunk histogram of one radix pass.
    Histogram,
    /// Per-row digit search of one radix pass.
    Scan,
    /// Per-chunk counts of sure-kept slots and ties.
    Count,
    /// Per-chunk placement of the kept slots.
    Place,
}

impl SelectPhase {
    /// All phases.
    pub const ALL: [SelectPhase; 4] =
        [SelectPhase::Histogram, SelectPhase::Scan, SelectPhase::Count, SelectPhase::Place];

    /// `hist`, `scan`, `count`, `place`.
    pub const fn tag(self) -> &'static str {
        match self {
            SelectPhase::Histogram => "hist",
            SelectPhase::Scan => "scan",
            SelectPhase::Count => "count",
            SelectPhase::Place => "place",
        }
    }

    /// Threads per block of the phase's kernel (the scan runs one thread per digit).
    pub const fn threads(self) -> usize {
        match self {
            SelectPhase::Scan => 256,
            _ => SELECT_PASS_THREADS,
        }
    }
}

/// Threads per block of the per-chunk multi-block `select` kernels.
pub const SELECT_PASS_THREADS: usize = 256;

/// Dense index of a variant in [`table`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VariantId(pub u16);

/// One compiled kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    /// Its index in [`table`].
    pub id: VariantId,
    /// What it computes and its compile-time knobs.
    pub kernel: Kernel,
}

/// Elements per 16-byte chunk.
const fn vec_elems(dtype: DType) -> usize {
    16 / dtype.size()
}

/// Largest power of two dividing `n`, at most 32 (`pow2_part` in cuda/common/types.cuh).
const fn pow2_part(n: usize) -> usize {
    let mut p = 1;
    while n.is_multiple_of(2 * p) && 2 * p <= 32 {
        p *= 2;
    }
    p
}

/// `(threads per row, chunks per half-row per thread)` of `RowTeam` in types.cuh.
pub const fn row_team(dtype: DType, head_dim: usize) -> (usize, usize) {
    let half_chunks = head_dim / 2 / vec_elems(dtype);
    let tpr = pow2_part(half_chunks);
    (tpr, half_chunks / tpr)
}

const MEAN_THREADS: usize = 256;

/// Keys per block of the mean kernel: six 16-byte loads in flight per thread (three rows of two
/// mirrored chunks, or one row of six), which keeps it within 128 registers, so two blocks of 256
/// threads fit an SM (48 KiB of loads in flight per SM).
const fn mean_block_keys(dtype: DType, head_dim: usize) -> usize {
    let (tpr, cpt) = row_team(dtype, head_dim);
    let rows_per_thread = if cpt >= 3 { 1 } else { 3 / cpt };
    MEAN_THREADS / tpr * rows_per_thread
}

/// `(keys per block, threads)` of the mean kernel's alternatives, default first. The default
/// keeps six 16-byte loads in flight per thread at 256 threads; where tuning pays (16-bit keys of
/// head_dim 64 and 128, the shapes of served models) two more: two thirds of the loads per
/// thread (fewer registers, more blocks per SM), and the default loads at 128 threads (more,
/// smaller blocks for short rows).
fn mean_tiles(dtype: DType, head_dim: usize) -> Vec<(usize, usize)> {
    let default = (mean_block_keys(dtype, head_dim), MEAN_THREADS);
    let (tpr, cpt) = row_team(dtype, head_dim);
    if dtype == DType::F32 || !(head_dim == 64 || head_dim == 128) || cpt != 1 {
        return vec![default];
    }
    vec![default, (MEAN_THREADS / tpr * 2, MEAN_THREADS), (MEAN_THREADS / 2 / tpr * 3, MEAN_THREADS / 2)]
}

/// `(keys per block, threads)` of the max kernel's alternatives, default first: for bf16 keys of
/// head_dim 64 and 128 also the half tile (64 keys, 4 warps), which halves the shared memory and
/// doubles the blocks per SM.
fn max_tiles(dtype: DType, head_dim: usize) -> Vec<(usize, usize)> {
    let default = max_tile(dtype, head_dim);
    if dtype == DType::Bf16 && (head_dim == 64 || head_dim == 128) {
        vec![default, (64, 128)]
    } else {
        vec![default]
    }
}

/// `(keys per block, threads)` of the max kernel: one 16-row block per warp. Larger tiles share
/// each head's weight image among more keys; f16/f32 tiles (kept as f32 in shared memory) and
/// head_dim 256 stay smaller so every variant fits the 99 KiB of shared memory of sm_86/sm_89
/// with 32 weight vectors.
const fn max_tile(dtype: DType, head_dim: usize) -> (usize, usize) {
    match (dtype, head_dim > 128) {
        (_, true) => (32, 64),
        (DType::Bf16, false) => (128, 256),
        (_, false) => (64, 128),
    }
}

/// Every variant, in id order. The same list on every call.
pub fn table() -> Vec<Variant> {
    cached().to_vec()
}

/// The table, built once: lookups on a launch path allocate nothing after the first.
fn cached() -> &'static [Variant] {
    static TABLE: std::sync::OnceLock<Vec<Variant>> = std::sync::OnceLock::new();
    TABLE.get_or_init(build_table)
}

fn build_table() -> Vec<Variant> {
    let mut kernels = Vec::new();
    for algo in [ScoreAlgo::Mean, ScoreAlgo::Max] {
        for dtype in DType::ALL {
            for head_dim in HEAD_DIMS {
                let tiles = match algo {
                    ScoreAlgo::Mean => mean_tiles(dtype, head_dim),
                    ScoreAlgo::Max => max_tiles(dtype, head_dim),
                };
                for (block_keys, threads) in tiles {
                    kernels.push(Kernel::Score { dtype, head_dim, algo, block_keys, threads });
                }
            }
        }
    }
    kernels.push(Kernel::Trig { threads: 128 });
    for threads in SELECT_THREADS {
        kernels.push(Kernel::Select { threads });
    }
    kernels.push(Kernel::Reduce { threads: 256 });
    kernels.push(Kernel::ReduceShard { threads: 256 });
    kernels.push(Kernel::Normalize { threads: 256 });
    for mode in [CompactMode::OrderPreserving, CompactMode::HoleFilling] {
        for (threads, chunks) in COMPACT_TILES {
            kernels.push(Kernel::Compact { mode, threads, chunks });
        }
    }
    for dtype in DType::ALL {
        kernels.push(Kernel::Calibrate { dtype, threads: CALIBRATE_THREADS });
    }
    for phase in SelectPhase::ALL {
        kernels.push(Kernel::SelectPass { phase, threads: phase.threads() });
    }
    for dtype in DType::ALL {
        for head_dim in HEAD_DIMS {
            kernels.push(Kernel::Decode { dtype, head_dim, rows: DECODE_ROWS, threads: DECODE_THREADS });
            if dtype != DType::F32 && (head_dim == 64 || head_dim == 128) {
                for (rows, threads) in DECODE_ALTERNATIVES {
                    kernels.push(Kernel::Decode { dtype, head_dim, rows, threads });
                }
            }
        }
    }
    kernels.push(Kernel::DecodeCombine { threads: DECODE_COMBINE_THREADS });
    kernels.into_iter().enumerate().map(|(i, kernel)| Variant { id: VariantId(i as u16), kernel }).collect()
}

/// The scoring variant the built-in rule picks for a key dtype, head_dim and algorithm (the
/// first of its family), if one is compiled.
pub fn score_variant(dtype: DType, head_dim: usize, algo: ScoreAlgo) -> Option<Variant> {
    cached().iter().copied().find(|v| {
        matches!(v.kernel, Kernel::Score { dtype: t, head_dim: d, algo: a, .. } if t == dtype && d == head_dim && a == algo)
    })
}

/// The trig (weights) variant.
pub fn trig_variant() -> Variant {
    cached().iter().copied().find(|v| matches!(v.kernel, Kernel::Trig { .. })).expect("the table has a trig kernel")
}

/// Threads per block of the compiled single-block `select` variants (the built-in rule uses 256
/// and 512; 128 is a tuning candidate for short rows and many of them).
pub const SELECT_THREADS: [usize; 3] = [256, 512, 128];

/// Row length from which `select` uses its 512-thread variant.
const SELECT_WIDE_FROM: usize = 4096;

/// The `select` variant for rows of `len` slots.
pub fn select_variant(len: usize) -> Variant {
    let threads = if len >= SELECT_WIDE_FROM { 512 } else { 256 };
    select_variant_with(threads).expect("the table has both select widths")
}

/// The multi-block `select` kernel of `phase`.
pub fn select_pass_variant(phase: SelectPhase) -> Variant {
    cached()
        .iter()
        .copied()
        .find(|v| matches!(v.kernel, Kernel::SelectPass { phase: p, .. } if p == phase))
        .expect("the table has every multi-block select phase")
}

/// The `normalize` variant.
pub fn normalize_variant() -> Variant {
    cached()
        .iter()
        .copied()
        .find(|v| matches!(v.kernel, Kernel::Normalize { .. }))
        .expect("the table has a normalize kernel")
}

/// The `reduce` variant of sharded rounds.
pub fn reduce_shard_variant() -> Variant {
    cached()
        .iter()
        .copied()
        .find(|v| matches!(v.kernel, Kernel::ReduceShard { .. }))
        .expect("the table has a reduce shard kernel")
}

/// The `reduce` variant.
pub fn reduce_variant() -> Variant {
    cached().iter().copied().find(|v| matches!(v.kernel, Kernel::Reduce { .. })).expect("the table has a reduce kernel")
}

/// The `select` variant with `threads` threads per block, if one is compiled.
pub fn select_variant_with(threads: usize) -> Option<Variant> {
    cached().iter().copied().find(|v| v.kernel == Kernel::Select { threads })
}

/// How `compact` moves rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompactMode {
    /// Row `i` receives row `keep[i]` (slot order stays position order); out of place, or in
    /// place with one block per (layer, KV head).
    OrderPreserving,
    /// Kept rows at or beyond the new length fill the lowest evicted slots; in place, moves at
    /// most the evicted count.
    HoleFilling,
}

impl CompactMode {
    /// `order` or `hole`.
    pub const fn tag(self) -> &'static str {
        match self {
            CompactMode::OrderPreserving => "order",
            CompactMode::HoleFilling => "hole",
        }
    }

    /// `COMPACT_ORDER` / `COMPACT_HOLE` in compact.cuh.
    const fn cuda_name(self) -> &'static str {
        match self {
            CompactMode::OrderPreserving => "tri::COMPACT_ORDER",
            CompactMode::HoleFilling => "tri::COMPACT_HOLE",
        }
    }
}

/// Threads per block of the built-in `compact` variants.
pub const COMPACT_THREADS: usize = 256;
/// 16-byte chunks each thread of the built-in `compact` variants stages per tile (a tile holds
/// `256 * 4 * 16` bytes).
pub const COMPACT_CHUNKS: usize = 4;
/// `(threads, chunks)` of the compiled `compact` variants of each mode, default first: twice the
/// bytes in flight per block, and half-size blocks (more of them for short keep sets).
pub const COMPACT_TILES: [(usize, usize); 3] = [(COMPACT_THREADS, COMPACT_CHUNKS), (256, 8), (128, 4)];
/// Threads per block of the `calibrate` kernels (32 pairs x 4 token lanes).
pub const CALIBRATE_THREADS: usize = 128;

/// The built-in `compact` variant of `mode` (the first of its family).
pub fn compact_variant(mode: CompactMode) -> Variant {
    cached()
        .iter()
        .copied()
        .find(|v| matches!(v.kernel, Kernel::Compact { mode: m, .. } if m == mode))
        .expect("the table has both compact modes")
}

/// The `calibrate` variant for queries of `dtype`.
pub fn calibrate_variant(dtype: DType) -> Variant {
    cached()
        .iter()
        .copied()
        .find(|v| matches!(v.kernel, Kernel::Calibrate { dtype: t, .. } if t == dtype))
        .expect("the table has a calibrate kernel per dtype")
}

/// Query rows (G x T of one KV head) a decode block holds: 8 covers GQA groups up to 8 at one
/// query per step in one block; more rows take more blocks (each reading the list again).
pub const DECODE_ROWS: usize = 8;
/// Threads of a decode block (also list entries per tile).
pub const DECODE_THREADS: usize = 128;
/// `(rows, threads)` of the tuning candidates of decode, beside the built-in `(DECODE_ROWS,
/// DECODE_THREADS)`, for 16-bit K/V of head_dim 64 and 128: tiles of 256 list entries (fewer,
/// longer tiles: fewer block-wide syncs per entry), and blocks of 4 query rows (GQA groups of 4
/// at one query per step fill them, twice the blocks of the default).
pub const DECODE_ALTERNATIVES: [(usize, usize); 2] = [(8, 256), (4, 128)];
/// Threads of a decode-combine block.
pub const DECODE_COMBINE_THREADS: usize = 128;
/// Largest value dimension Dv of a decode.
pub const DECODE_MAX_DV: usize = 256;
/// Most splits of one decode.
pub const DECODE_MAX_SPLITS: usize = 128;

/// The built-in decode variant for a K/V dtype and head_dim (the first of its family), if one
/// is compiled.
pub fn decode_variant(dtype: DType, head_dim: usize) -> Option<Variant> {
    cached()
        .iter()
        .copied()
        .find(|v| matches!(v.kernel, Kernel::Decode { dtype: t, head_dim: d, .. } if t == dtype && d == head_dim))
}

/// The decode-combine variant.
pub fn decode_combine_variant() -> Variant {
    cached()
        .iter()
        .copied()
        .find(|v| matches!(v.kernel, Kernel::DecodeCombine { .. }))
        .expect("the table has a decode combine kernel")
}

/// The variant whose symbol is `symbol`, if this build's table has it.
pub fn variant_by_symbol(symbol: &str) -> Option<Variant> {
    cached().iter().copied().find(|v| v.symbol() == symbol)
}

/// The variants of `family`, in table order (the first is the built-in choice, except for
/// `select f32`, whose built-in rule picks by row length).
pub fn family_members(family: &str) -> Vec<Variant> {
    cached().iter().copied().filter(|v| v.family() == family).collect()
}

/// Every family of the table, in table order of their first variant.
pub fn families() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in cached() {
        let f = v.family();
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// A fingerprint of the variant table: FNV-1a (64 bits) over every symbol in table order, as 16
/// hex digits. A tuning table records it; a different build (variants added, removed or
/// renumbered) has another.
pub fn table_hash() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in cached() {
        for b in v.symbol().bytes().chain(std::iter::once(b';')) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

impl Variant {
    /// The set of variants interchangeable with this one for the same inputs (same op, dtypes,
    /// head_dim, algorithm or mode): equal strings, interchangeable variants; a tuning table
    /// chooses among them. `score bf16 d128 mean`, `select f32`, `compact bytes hole`,
    /// `decode bf16 d128`. The multi-block `select` path is a member of `select f32` under the
    /// name of its first kernel (`triattn_select_f32_ahist_nt256`); its later kernels are
    /// families of their own.
    pub fn family(&self) -> String {
        match self.kernel {
            Kernel::Score { dtype, head_dim, algo, .. } => format!("score {} d{head_dim} {}", dtype.tag(), algo.tag()),
            Kernel::Trig { .. } => "score f64 trig".to_string(),
            Kernel::Select { .. } | Kernel::SelectPass { phase: SelectPhase::Histogram, .. } => {
                "select f32".to_string()
            }
            Kernel::SelectPass { phase, .. } => format!("select f32 multi {}", phase.tag()),
            Kernel::Reduce { .. } => "reduce f32".to_string(),
            Kernel::ReduceShard { .. } => "reduce f32 shard".to_string(),
            Kernel::Normalize { .. } => "normalize f32".to_string(),
            Kernel::Compact { mode, .. } => format!("compact bytes {}", mode.tag()),
            Kernel::Calibrate { dtype, .. } => format!("calibrate {}", dtype.tag()),
            Kernel::Decode { dtype, head_dim, .. } => format!("decode {} d{head_dim}", dtype.tag()),
            Kernel::DecodeCombine { .. } => "decode f32 combine".to_string(),
        }
    }

    /// The op this variant computes.
    pub fn op(&self) -> &'static str {
        match self.kernel {
            Kernel::Select { .. } | Kernel::SelectPass { .. } => "select",
            Kernel::Reduce { .. } | Kernel::ReduceShard { .. } => "reduce",
            Kernel::Normalize { .. } => "normalize",
            Kernel::Compact { .. } => "compact",
            Kernel::Calibrate { .. } => "calibrate",
            Kernel::Decode { .. } | Kernel::DecodeCombine { .. } => "decode",
            _ => "score",
        }
    }

    /// The one place a kernel symbol is spelled; build.rs uses it too.
    pub fn symbol(&self) -> String {
        match self.kernel {
            Kernel::Score { dtype, head_dim, algo, block_keys, threads } => {
                format!("triattn_score_{}_d{head_dim}_a{}_bn{block_keys}_nt{threads}", dtype.tag(), algo.tag())
            }
            Kernel::Trig { threads } => format!("triattn_score_f64_atrig_nt{threads}"),
            Kernel::Compact { mode, threads, chunks } => {
                format!("triattn_compact_bytes_a{}_c{chunks}_nt{threads}", mode.tag())
            }
            Kernel::Calibrate { dtype, threads } => format!("triattn_calibrate_{}_nt{threads}", dtype.tag()),
            Kernel::Decode { dtype, head_dim, rows, threads } => {
                format!("triattn_decode_{}_d{head_dim}_r{rows}_nt{threads}", dtype.tag())
            }
            Kernel::DecodeCombine { threads } => format!("triattn_decode_f32_acombine_nt{threads}"),
            Kernel::Select { threads } => format!("triattn_select_f32_nt{threads}"),
            Kernel::SelectPass { phase, threads } => format!("triattn_select_f32_a{}_nt{threads}", phase.tag()),
            Kernel::Reduce { threads } => format!("triattn_reduce_f32_nt{threads}"),
            Kernel::ReduceShard { threads } => format!("triattn_reduce_f32_ashard_nt{threads}"),
            Kernel::Normalize { threads } => format!("triattn_normalize_f32_nt{threads}"),
        }
    }

    /// Dtype tag as in the symbol (`f64` for the trig kernel's arithmetic).
    pub fn dtype_tag(&self) -> &'static str {
        match self.kernel {
            Kernel::Score { dtype, .. } => dtype.tag(),
            Kernel::Trig { .. } => "f64",
            Kernel::Compact { .. } => "bytes",
            Kernel::Calibrate { dtype, .. } | Kernel::Decode { dtype, .. } => dtype.tag(),
            Kernel::Select { .. }
            | Kernel::SelectPass { .. }
            | Kernel::Reduce { .. }
            | Kernel::ReduceShard { .. }
            | Kernel::Normalize { .. }
            | Kernel::DecodeCombine { .. } => "f32",
        }
    }

    /// The knobs after the dtype, space separated: `d128 amean bn96 nt256`.
    pub fn knobs(&self) -> String {
        match self.kernel {
            Kernel::Score { head_dim, algo, block_keys, threads, .. } => {
                format!("d{head_dim} a{} bn{block_keys} nt{threads}", algo.tag())
            }
            Kernel::Trig { threads } => format!("atrig nt{threads}"),
            Kernel::Compact { mode, threads, chunks } => format!("a{} c{chunks} nt{threads}", mode.tag()),
            Kernel::Calibrate { threads, .. } => format!("nt{threads}"),
            Kernel::Decode { head_dim, rows, threads, .. } => format!("d{head_dim} r{rows} nt{threads}"),
            Kernel::DecodeCombine { threads } => format!("acombine nt{threads}"),
            Kernel::ReduceShard { threads } => format!("ashard nt{threads}"),
            Kernel::SelectPass { phase, threads } => format!("a{} nt{threads}", phase.tag()),
            Kernel::Select { threads } | Kernel::Reduce { threads } | Kernel::Normalize { threads } => {
                format!("nt{threads}")
            }
        }
    }

    /// Blocks per SM the kernel is compiled for (`__launch_bounds__` second argument): 2 for the
    /// memory-bound mean kernel (at most 128 registers), 1 otherwise.
    pub fn min_blocks(&self) -> usize {
        match self.kernel {
            Kernel::Score { algo: ScoreAlgo::Mean, .. } => 2,
            _ => 1,
        }
    }

    /// Threads per block.
    pub fn threads(&self) -> usize {
        match self.kernel {
            Kernel::Score { threads, .. }
            | Kernel::Trig { threads }
            | Kernel::Select { threads }
            | Kernel::Reduce { threads }
            | Kernel::ReduceShard { threads }
            | Kernel::Normalize { threads } => threads,
            Kernel::Compact { threads, .. }
            | Kernel::Calibrate { threads, .. }
            | Kernel::SelectPass { threads, .. }
            | Kernel::Decode { threads, .. }
            | Kernel::DecodeCombine { threads } => threads,
        }
    }

    /// Dynamic shared memory of a launch with `vectors` weight vectors per head
    /// (`max_smem_bytes` in score.cuh); 0 for kernels with static shared memory only.
    pub fn dynamic_smem_bytes(&self, vectors: usize) -> usize {
        match self.kernel {
            Kernel::Score { dtype, head_dim, algo: ScoreAlgo::Max, block_keys, .. } => {
                // bf16 keys stay bf16 ([BN][D + 8]); f16/f32 keys are kept as f32 ([BN][D + 4]).
                let keys = if dtype == DType::Bf16 {
                    2 * block_keys * (head_dim + 8)
                } else {
                    4 * block_keys * (head_dim + 4)
                };
                let f = head_dim / 2;
                let jpad = vectors.div_ceil(8) * 8;
                keys + 4 * block_keys * (f + 1) + 4 * f + 4 * block_keys + 2 * 3 * jpad * (head_dim + 8)
            }
            _ => 0,
        }
    }

    /// Static shared memory the kernel declares (what ptxas reports as `smem`).
    pub fn static_smem_bytes(&self) -> usize {
        match self.kernel {
            Kernel::Score { head_dim, algo: ScoreAlgo::Mean, block_keys, .. } => {
                4 * SCORE_HEAD_CHUNK * (head_dim + head_dim / 2 + block_keys)
            }
            Kernel::Score { .. } => 0,
            Kernel::Trig { .. } => 2 * 32 * 32 * 8,
            Kernel::Compact { threads, chunks, .. } => 2 * 4 * threads * chunks,
            Kernel::Calibrate { threads, .. } => 3 * threads * 8,
            // hist[256], two warp totals per warp, found[3] (select.cuh), as ptxas rounds it.
            Kernel::Select { threads } => (4 * (256 + 2 * (threads / 32) + 3)).next_multiple_of(16),
            // multi.cuh: hist[256]; hist[256] + found[3]; totals[2]; two warp totals per warp
            // + before[2].
            Kernel::SelectPass { phase, threads } => match phase {
                SelectPhase::Histogram => 4 * 256,
                SelectPhase::Scan => (4 * (256 + 3usize)).next_multiple_of(16),
                SelectPhase::Count => 16,
                SelectPhase::Place => (4 * (2 * (threads / 32) + 2)).next_multiple_of(16),
            },
            Kernel::Reduce { .. } | Kernel::ReduceShard { .. } => 0,
            Kernel::Normalize { .. } => 16,
            // q_s, p_s, slot_s, three row stats, acc_s (decode.cuh).
            Kernel::Decode { head_dim, rows, threads, .. } => {
                4 * rows * head_dim + 4 * rows * threads + 4 * threads + 3 * 4 * rows + 4 * rows * DECODE_MAX_DV
            }
            // w_s, row_s (combine.cuh), as ptxas rounds it.
            Kernel::DecodeCombine { .. } => (4 * DECODE_MAX_SPLITS + 8).next_multiple_of(16),
        }
    }

    /// Shared memory of a launch at [`MAX_VECTORS`] weight vectors: the table's static bytes plus
    /// the dynamic bytes (the most any launch of this variant asks for).
    pub fn max_shared_bytes(&self) -> usize {
        self.static_smem_bytes() + self.dynamic_smem_bytes(MAX_VECTORS)
    }

    /// Bytes left under the per-block shared-memory limit of `arch` (see
    /// [`max_shared_per_block`]) by a launch at [`MAX_VECTORS`] weight vectors, using the table's
    /// static bytes; negative when the variant does not fit, `None` for an arch of unknown limit.
    pub fn shared_headroom(&self, arch: u32) -> Option<i64> {
        self.shared_headroom_with(self.static_smem_bytes(), arch)
    }

    /// [`Variant::shared_headroom`] with the static shared memory `static_bytes` that ptxas
    /// reported for this variant on `arch` (what build.rs checks).
    pub fn shared_headroom_with(&self, static_bytes: usize, arch: u32) -> Option<i64> {
        let limit = max_shared_per_block(arch)?;
        Some(limit as i64 - (static_bytes + self.dynamic_smem_bytes(MAX_VECTORS)) as i64)
    }

    /// The C++ expression of the kernel body, for the instantiation units (`p` is the params).
    pub fn template_call(&self) -> String {
        match self.kernel {
            Kernel::Score { dtype, head_dim, algo, block_keys, threads } => {
                let t = match dtype {
                    DType::F32 => "float",
                    DType::F16 => "tri::f16_t",
                    DType::Bf16 => "tri::bf16_t",
                };
                format!("tri::score_{}<{t}, {head_dim}, {block_keys}, {threads}>(p)", algo.tag())
            }
            Kernel::Trig { threads } => format!("tri::score_trig<{threads}>(p)"),
            Kernel::Compact { mode, threads, chunks } => {
                format!("tri::compact<{}, {threads}, {chunks}>(p)", mode.cuda_name())
            }
            Kernel::Calibrate { dtype, threads } => {
                let t = match dtype {
                    DType::F32 => "float",
                    DType::F16 => "tri::f16_t",
                    DType::Bf16 => "tri::bf16_t",
                };
                format!("tri::calibrate<{t}, {threads}>(p)")
            }
            Kernel::Select { threads } => format!("tri::select_topk<{threads}>(p)"),
            Kernel::SelectPass { phase, threads } => match phase {
                SelectPhase::Histogram => format!("tri::select_hist<{threads}>(p)"),
                SelectPhase::Scan => format!("tri::select_scan<{threads}>(p)"),
                SelectPhase::Count => format!("tri::select_count<{threads}>(p)"),
                SelectPhase::Place => format!("tri::select_place<{threads}>(p)"),
            },
            Kernel::Reduce { threads } => format!("tri::reduce_rows<{threads}>(p)"),
            Kernel::ReduceShard { threads } => format!("tri::reduce_shard<{threads}>(p)"),
            Kernel::Normalize { threads } => format!("tri::normalize_rows<{threads}>(p)"),
            Kernel::Decode { dtype, head_dim, rows, threads } => {
                let t = match dtype {
                    DType::F32 => "float",
                    DType::F16 => "tri::f16_t",
                    DType::Bf16 => "tri::bf16_t",
                };
                format!("tri::decode<{t}, {head_dim}, {rows}, {threads}>(p)")
            }
            Kernel::DecodeCombine { threads } => format!("tri::decode_combine<{threads}>(p)"),
        }
    }

    /// The C++ expression of its dynamic shared memory for `v` weight vectors (`max_smem_bytes`
    /// in score.cuh), for the emu unit's cross-check of [`Variant::dynamic_smem_bytes`].
    pub fn smem_call(&self) -> String {
        match self.kernel {
            Kernel::Score { dtype, head_dim, algo: ScoreAlgo::Max, block_keys, .. } => {
                let t = match dtype {
                    DType::F32 => "float",
                    DType::F16 => "tri::f16_t",
                    DType::Bf16 => "tri::bf16_t",
                };
                format!("tri::max_smem_bytes<{t}, {head_dim}, {block_keys}>(v)")
            }
            _ => "0".to_string(),
        }
    }

    /// The C++ params struct the kernel takes by value.
    pub fn params_type(&self) -> &'static str {
        match self.kernel {
            Kernel::Score { .. } => "tri_score_params",
            Kernel::Trig { .. } => "tri_trig_params",
            Kernel::Compact { .. } => "tri_compact_params",
            Kernel::Calibrate { .. } => "tri_calibrate_params",
            Kernel::Select { .. } | Kernel::SelectPass { .. } => "tri_select_params",
            Kernel::Reduce { .. } => "tri_reduce_params",
            Kernel::ReduceShard { .. } => "tri_reduce_shard_params",
            Kernel::Normalize { .. } => "tri_normalize_params",
            Kernel::Decode { .. } => "tri_decode_params",
            Kernel::DecodeCombine { .. } => "tri_decode_combine_params",
        }
    }
}

/// Shared memory one block may use on SM version `arch` (static plus dynamic, with the opt-in
/// attribute that the launchers set), in bytes; `None` for an architecture not listed. From the
/// CUDA C++ Programming Guide, "Compute capabilities" table: 7.0 and 7.2: 96 KB; 7.5: 64 KB; 8.0
/// and 8.7: 163 KB; 8.6, 8.9, 12.x: 99 KB; 9.0, 10.x, 11.0: 227 KB (1 KB = 1024 bytes).
pub const fn max_shared_per_block(arch: u32) -> Option<usize> {
    match arch {
        70 | 72 => Some(96 * 1024),
        75 => Some(64 * 1024),
        80 | 87 => Some(163 * 1024),
        86 | 89 | 120 | 121 => Some(99 * 1024),
        90 | 100 | 101 | 103 | 110 => Some(227 * 1024),
        _ => None,
    }
}

/// What `triattn kernels` shows for one variant on one architecture; `--json` prints its serde
/// serialization, one object per line.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(triattn_crate, derive(serde::Serialize))]
pub struct KernelInfo {
    /// Kernel symbol.
    pub symbol: String,
    /// Op: `score`.
    pub op: &'static str,
    /// The variants interchangeable with this one share this string ([`Variant::family`]).
    pub family: String,
    /// Dtype tag.
    pub dtype: &'static str,
    /// Knobs after the dtype: `d128 amean bn96 nt256`.
    pub knobs: String,
    /// `sm_90`, or `none` when this build compiled no CUDA kernels.
    pub arch: String,
    /// Registers per thread (ptxas).
    pub registers: Option<u32>,
    /// Shared memory per block: static (ptxas) plus dynamic at [`MAX_VECTORS`] weight vectors.
    pub shared_bytes: Option<u32>,
    /// Spill stores plus spill loads, bytes (ptxas).
    pub spill_bytes: Option<u32>,
    /// Stack frame bytes (ptxas).
    pub stack_bytes: Option<u32>,
    /// Tensor-core (HMMA) instructions in the SASS, when cuobjdump was available at build time.
    pub hmma: Option<u32>,
}

#[cfg(triattn_crate)]
impl KernelInfo {
    /// One JSON object, no trailing newline (`triattn kernels --json`).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("a KernelInfo of strings and numbers serializes")
    }
}

/// The ptxas report of this build, `symbol,arch,registers,smem,stack,spill_stores,spill_loads,hmma`
/// records separated by `;` (set by build.rs; empty when no CUDA kernels were compiled; `hmma`
/// empty when cuobjdump did not inspect the SASS).
fn ptxas_report() -> &'static str {
    option_env!("TRIATTN_KERNEL_REPORT").unwrap_or("")
}

/// The architectures this build compiled CUDA kernels for (`sm_80`, ...; `TRIATTN_CUDA_ARCHS`
/// as build.rs read it), ascending; empty without the `cuda` feature or with `TRIATTN_NO_NVCC`.
pub fn built_archs() -> Vec<&'static str> {
    option_env!("TRIATTN_BUILT_ARCHS").unwrap_or("").split(';').filter(|a| !a.is_empty()).collect()
}

/// Every variant on every compiled architecture, in table order then arch order; one row per
/// variant with `arch = "none"` and no numbers when the build compiled no CUDA kernels.
pub fn kernel_report() -> Vec<KernelInfo> {
    report_from(ptxas_report())
}

/// [`kernel_report`] from the records of `report` (the format of `TRIATTN_KERNEL_REPORT`).
fn report_from(report: &str) -> Vec<KernelInfo> {
    let records: Vec<Vec<&str>> = report.split(';').filter(|r| !r.is_empty()).map(|r| r.split(',').collect()).collect();
    let mut out = Vec::new();
    for v in table() {
        let symbol = v.symbol();
        let dynamic = v.dynamic_smem_bytes(MAX_VECTORS) as u32;
        let mut found = false;
        for r in records.iter().filter(|r| r.len() >= 7 && r[0] == symbol) {
            let n = |i: usize| r[i].parse::<u32>().ok();
            found = true;
            out.push(KernelInfo {
                symbol: symbol.clone(),
                op: v.op(),
                family: v.family(),
                dtype: v.dtype_tag(),
                knobs: v.knobs(),
                arch: r[1].to_string(),
                registers: n(2),
                shared_bytes: n(3).map(|s| s + dynamic),
                stack_bytes: n(4),
                spill_bytes: n(5).zip(n(6)).map(|(a, b)| a + b),
                hmma: if r.len() > 7 { n(7) } else { None },
            });
        }
        if !found {
            out.push(KernelInfo {
                symbol,
                op: v.op(),
                family: v.family(),
                dtype: v.dtype_tag(),
                knobs: v.knobs(),
                arch: "none".to_string(),
                registers: None,
                shared_bytes: Some(v.static_smem_bytes() as u32 + dynamic),
                spill_bytes: None,
                stack_bytes: None,
                hmma: None,
            });
        }
    }
    out
}

/// `triattn kernels` as a text table: op, dtype, knobs, arch, registers, shared memory, spills.
pub fn kernel_table(rows: &[KernelInfo]) -> String {
    let dash = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let mut s = format!(
        "{:<9} {:<22} {:<5} {:<24} {:<6} {:>9} {:>12} {:>11} {:>5}  {}\n",
        "op", "family", "dtype", "knobs", "arch", "registers", "shared_bytes", "spill_bytes", "hmma", "symbol"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<9} {:<22} {:<5} {:<24} {:<6} {:>9} {:>12} {:>11} {:>5}  {}\n",
            r.op,
            r.family,
            r.dtype,
            r.knobs,
            r.arch,
            dash(r.registers),
            dash(r.shared_bytes),
            dash(r.spill_bytes),
            dash(r.hmma),
            r.symbol
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_unique_and_ids_dense() {
        let t = table();
        let mut names: Vec<String> = t.iter().map(|v| v.symbol()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), t.len());
        assert!(t.iter().enumerate().all(|(i, v)| v.id.0 as usize == i));
        assert!(names.contains(&"triattn_score_bf16_d128_amean_bn96_nt256".to_string()));
    }

    #[test]
    fn every_dtype_and_head_dim_has_both_algorithms() {
        for dtype in DType::ALL {
            for d in HEAD_DIMS {
                assert!(score_variant(dtype, d, ScoreAlgo::Mean).is_some());
                assert!(score_variant(dtype, d, ScoreAlgo::Max).is_some());
            }
        }
    }

    #[test]
    fn shared_headroom_is_the_limit_minus_static_and_dynamic_bytes() {
        // f32 keys, head_dim 256, max: 33280 (tile) + 16512 (moduli) + 512 (norm) + 128 (out) +
        // 50688 (3 x 32 x 264 bf16 weights) = 101120 bytes of dynamic shared memory.
        let v = score_variant(DType::F32, 256, ScoreAlgo::Max).unwrap();
        assert_eq!(v.max_shared_bytes(), 101_120);
        assert_eq!(v.shared_headroom(86), Some(256));
        assert_eq!(v.shared_headroom(89), Some(256));
        assert_eq!(v.shared_headroom(80), Some(163 * 1024 - 101_120));
        assert_eq!(v.shared_headroom(90), Some(227 * 1024 - 101_120));
        assert_eq!(v.shared_headroom(75), Some(64 * 1024 - 101_120), "negative: does not fit sm_75");
        assert_eq!(v.shared_headroom(61), None);
        // ptxas's static bytes replace the table's.
        let mean = score_variant(DType::Bf16, 128, ScoreAlgo::Mean).unwrap();
        assert_eq!(mean.shared_headroom_with(1000, 90), Some(227 * 1024 - 1000));
        assert_eq!(mean.shared_headroom(90), Some(227 * 1024 - mean.static_smem_bytes() as i64));
    }

    #[test]
    fn every_variant_fits_every_default_arch() {
        for arch in [80, 86, 89, 90] {
            for v in table() {
                let room = v.shared_headroom(arch).unwrap();
                assert!(room >= 0, "{} needs {} bytes on sm_{arch}", v.symbol(), v.max_shared_bytes());
            }
        }
    }

    /// A report of known records becomes rows with those numbers (shared memory plus the
    /// dynamic part at 32 vectors, spills summed), and one JSON object per row with the contract
    /// fields and types; a variant without records gets one `none` row, an unknown symbol none.
    #[test]
    fn report_rows_carry_the_record_numbers_as_json() {
        let max = score_variant(DType::Bf16, 128, ScoreAlgo::Max).unwrap();
        let mean = score_variant(DType::F16, 64, ScoreAlgo::Mean).unwrap();
        let (m, n) = (max.symbol(), mean.symbol());
        let rows = report_from(&format!(
            "{m},sm_80,168,0,8,4,12,96;{m},sm_90,170,0,0,0,0,;{n},sm_90,64,3072,0,0,0,0;triattn_score_nope,sm_90,1,2,3,4,5,6"
        ));
        assert_eq!(rows.len(), table().len() + 1, "two rows for {m}, one per other variant");
        let dynamic = max.dynamic_smem_bytes(MAX_VECTORS) as u64;
        let json = |r: &KernelInfo| serde_json::from_str::<serde_json::Value>(&r.to_json_line()).unwrap();
        let of = |sym: &str, arch: &str| {
            rows.iter().find(|r| r.symbol == sym && r.arch == arch).unwrap_or_else(|| panic!("no row {sym} {arch}"))
        };
        assert_eq!(
            json(of(&m, "sm_80")),
            serde_json::json!({
                "symbol": m, "op": "score", "family": "score bf16 d128 max", "dtype": "bf16", "knobs": max.knobs(), "arch": "sm_80",
                "registers": 168, "shared_bytes": dynamic, "spill_bytes": 16, "stack_bytes": 8, "hmma": 96
            })
        );
        assert_eq!(json(of(&m, "sm_90"))["hmma"], serde_json::Value::Null, "SASS not inspected");
        assert_eq!(json(of(&n, "sm_90"))["shared_bytes"], 3072);
        let none = of(&trig_variant().symbol(), "none");
        assert_eq!(none.shared_bytes, Some(trig_variant().static_smem_bytes() as u32));
        assert_eq!((none.registers, none.spill_bytes, none.hmma), (None, None, None));
        assert!(rows.iter().all(|r| r.symbol != "triattn_score_nope"));
        let line = of(&m, "sm_80").to_json_line();
        assert!(!line.contains('\n') && line.starts_with('{') && line.ends_with('}'), "{line}");
    }
}
