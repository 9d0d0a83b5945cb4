//! The hardware model behind the shipped tables (`tuning/sm_*.toml`, `source = "model"`), used
//! until a GPU of the arch measures them. `tuning/README.md` explains it; in short:
//!
//! - **Occupancy** per variant from this build's ptxas report for the arch (registers rounded to
//!   the allocation unit of 8 per thread, static plus dynamic shared memory) and the arch's
//!   per-SM limits (registers, threads, blocks, shared memory).
//! - **Memory-bound ops** (score mean, compact, decode): a stage moves `bytes`; an SM keeps
//!   `active blocks x bytes in flight per block` outstanding, and reaches the DRAM bandwidth only
//!   with `bandwidth x latency / SMs` of it (Little's law); fewer blocks than SMs leave SMs idle;
//!   a last partial wave costs a whole wave. Modelled time = bytes / (bandwidth x that fraction),
//!   times the wave quantisation.
//! - **score max** (tensor cores): the same work at any tile; the default tile unless its grid
//!   has fewer blocks than SMs, where the half tile's twice as many blocks win.
//! - **select**: one block per row reads its row once when it holds `NT x 16` slots, else once
//!   per radix pass (4), at most twice an SM's share of the bandwidth and never faster than
//!   the DRAM for all rows; rows fewer than the SMs leave them idle, which the multi-block path
//!   (4 launches, 5 reads of the row spread over chunks of 4096) avoids.
//!
//! Shapes: a Qwen3-8B-like model (36 layers, 32 heads, 8 KV heads, head_dim 128) for the round
//! ops, one layer at GQA group 8 for decode (so a candidate that re-reads lists for groups of 8
//! is not preferred on a group-4 model's evidence), the buckets of [`BUCKET_LENGTHS`] x
//! [`BUCKET_BATCHES`] at their upper bounds. Ties keep the built-in choice.

use crate::dtype::DType;
use crate::variant::{self, CompactMode, Kernel, ScoreAlgo, Variant};

use super::{TableSource, Tuning, TuningEntry, TuningMeta, FORMAT};

/// Upper bounds of the length buckets (the last is open).
pub const BUCKET_LENGTHS: [usize; 4] = [2176, 8192, 32768, 131_072];
/// Upper bounds of the batch buckets (the last is open).
pub const BUCKET_BATCHES: [usize; 3] = [1, 16, 64];

/// What the model knows of an architecture (a typical part of it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArchLimits {
    /// SM version.
    pub arch: u32,
    /// A typical part (for the record).
    pub part: &'static str,
    /// Streaming multiprocessors of that part.
    pub sms: usize,
    /// 32-bit registers per SM.
    pub registers: usize,
    /// Resident threads per SM.
    pub threads: usize,
    /// Resident blocks per SM.
    pub blocks: usize,
    /// Shared memory per SM, bytes (what blocks can use).
    pub shared: usize,
    /// DRAM bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// DRAM latency under load, ns.
    pub latency_ns: f64,
}

/// The architectures the shipped tables cover (CUDA C++ Programming Guide, compute capability
/// tables; vendor data sheets for SMs and bandwidth).
pub const ARCHS: [ArchLimits; 4] = [
    ArchLimits {
        arch: 80,
        part: "A100 80GB SXM",
        sms: 108,
        registers: 65536,
        threads: 2048,
        blocks: 32,
        shared: 164 * 1024,
        bandwidth_gbs: 2039.0,
        latency_ns: 600.0,
    },
    ArchLimits {
        arch: 86,
        part: "A10",
        sms: 72,
        registers: 65536,
        threads: 1536,
        blocks: 16,
        shared: 100 * 1024,
        bandwidth_gbs: 600.0,
        latency_ns: 600.0,
    },
    ArchLimits {
        arch: 89,
        part: "L40S",
        sms: 142,
        registers: 65536,
        threads: 1536,
        blocks: 24,
        shared: 100 * 1024,
        bandwidth_gbs: 864.0,
        latency_ns: 600.0,
    },
    ArchLimits {
        arch: 90,
        part: "H100 SXM",
        sms: 132,
        registers: 65536,
        threads: 2048,
        blocks: 32,
        shared: 228 * 1024,
        bandwidth_gbs: 3350.0,
        latency_ns: 700.0,
    },
];

/// The reference round shape: layers, heads, KV heads, head_dim, key bytes.
const LAYERS: usize = 36;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const DECODE_GROUP: usize = 8;

/// What ptxas reported for one variant on the arch.
#[derive(Clone, Copy, Debug)]
struct Resources {
    registers: usize,
    shared: usize,
}

fn resources(v: Variant, arch: u32) -> Option<Resources> {
    let name = format!("sm_{arch}");
    let symbol = v.symbol();
    variant::kernel_report().into_iter().find(|r| r.symbol == symbol && r.arch == name).and_then(|r| {
        Some(Resources { registers: r.registers? as usize, shared: r.shared_bytes.unwrap_or(0) as usize })
    })
}

/// Resident blocks per SM.
fn occupancy(v: Variant, r: Resources, a: &ArchLimits) -> usize {
    let threads = v.threads();
    let regs = r.registers.max(1).next_multiple_of(8) * threads;
    let by_regs = a.registers / regs.max(1);
    let by_threads = a.threads / threads;
    let by_shared = if r.shared == 0 { a.blocks } else { a.shared / (r.shared + 1024) };
    by_regs.min(by_threads).min(by_shared).min(a.blocks)
}

/// Modelled time of a memory-bound launch of `grid` blocks moving `bytes`, each block keeping
/// `in_flight` bytes outstanding.
fn memory_time(bytes: f64, grid: usize, in_flight: f64, occupancy: usize, a: &ArchLimits) -> f64 {
    if occupancy == 0 {
        return f64::INFINITY;
    }
    let slots = a.sms * occupancy;
    let waves = grid.div_ceil(slots).max(1);
    let per_sm_blocks = grid.div_ceil(a.sms).min(occupancy).max(1) as f64;
    let busy_sms = grid.min(a.sms).max(1) as f64;
    let needed = a.bandwidth_gbs * a.latency_ns / a.sms as f64; // bytes per SM (GB/s x ns = bytes)
    let fraction = (per_sm_blocks * in_flight / needed).min(1.0) * busy_sms / a.sms as f64;
    let quantisation = waves as f64 / (grid as f64 / slots as f64).max(1.0);
    bytes / (a.bandwidth_gbs * fraction) * quantisation
}

/// The modelled time of `v` at `len` slots and `batch` sequences on `a`, if the build has its
/// ptxas report for the arch.
fn modelled(v: Variant, len: usize, batch: usize, a: &ArchLimits) -> Option<f64> {
    let r = resources(v, a.arch)?;
    let occ = occupancy(v, r, a);
    Some(match v.kernel {
        Kernel::Score { dtype, head_dim, algo: ScoreAlgo::Mean, block_keys, .. } => {
            let bytes = (batch * LAYERS * KV_HEADS * len * head_dim * dtype.size()) as f64;
            let grid = len.div_ceil(block_keys) * LAYERS * KV_HEADS * batch;
            memory_time(bytes, grid, (block_keys * head_dim * dtype.size()) as f64, occ, a)
        }
        Kernel::Score { block_keys, .. } => {
            // Tensor cores: the same work at any tile; a grid of fewer blocks than SMs leaves
            // some idle, and occupancy is not modelled (the SMs' tensor cores are the limit).
            let grid = len.div_ceil(block_keys) * LAYERS * KV_HEADS * batch;
            let _ = occ;
            (len * batch) as f64 / grid.min(a.sms) as f64
        }
        Kernel::Compact { mode, threads, chunks } => {
            let kept = len.saturating_sub(128).max(len / 2);
            let rows = match mode {
                CompactMode::OrderPreserving => kept,
                CompactMode::HoleFilling => len - kept,
            };
            let row_bytes = 2 * HEAD_DIM * DType::Bf16.size();
            let bytes = (2 * batch * LAYERS * KV_HEADS * rows * row_bytes) as f64;
            let tile = threads * chunks * 16;
            let grid_x = match mode {
                CompactMode::OrderPreserving => 1,
                CompactMode::HoleFilling => (rows * row_bytes / 2).div_ceil(tile).max(1),
            };
            memory_time(bytes, grid_x * (LAYERS * KV_HEADS + KV_HEADS) * batch, tile as f64, occ, a)
        }
        Kernel::Decode { dtype, head_dim, rows, threads } => {
            let reads = DECODE_GROUP.div_ceil(rows);
            let bytes = (reads * batch * KV_HEADS * len * 2 * head_dim * dtype.size()) as f64;
            let base = KV_HEADS * reads * batch;
            let splits = if base >= 2 * a.sms { 1 } else { (2 * a.sms).div_ceil(base).min(len.div_ceil(threads)) };
            memory_time(bytes, base * splits, (threads * head_dim * dtype.size()) as f64, occ, a)
        }
        Kernel::Select { threads } => {
            let rows = KV_HEADS * batch;
            let passes = if len <= threads * 16 { 1.0 } else { 4.0 };
            let per_block_gbs = 2.0 * a.bandwidth_gbs / a.sms as f64;
            let waves = rows.div_ceil(a.sms * occ.max(1)) as f64;
            let per_row = waves * passes * (len * 4) as f64 / per_block_gbs;
            per_row.max(rows as f64 * passes * (len * 4) as f64 / a.bandwidth_gbs)
        }
        Kernel::SelectPass { .. } => {
            let rows = KV_HEADS * batch;
            let launches_ns = 4.0 * 3000.0;
            let chunks = rows * len.div_ceil(4096);
            let busy = chunks.min(a.sms) as f64 / a.sms as f64;
            launches_ns + 5.0 * (rows * len * 4) as f64 / (a.bandwidth_gbs * busy.max(1.0 / a.sms as f64))
        }
        _ => return None,
    })
}

/// The families the shipped tables cover: every family with more than one variant.
fn tuned_families() -> Vec<String> {
    variant::families().into_iter().filter(|f| variant::family_members(f).len() > 1).collect()
}

/// The model's table for SM version `arch`, from this build's ptxas report; `None` when the arch
/// is not modelled or this build did not compile it. Entries only where the model prefers a
/// candidate over the built-in choice by more than 5%.
pub fn model_table(arch: u32) -> Option<Tuning> {
    let a = ARCHS.iter().find(|a| a.arch == arch)?;
    if !variant::built_archs().contains(&format!("sm_{arch}").as_str()) {
        return None;
    }
    let mut entries = Vec::new();
    for family in tuned_families() {
        let members = variant::family_members(&family);
        for (li, &len) in BUCKET_LENGTHS.iter().enumerate() {
            for (bi, &batch) in BUCKET_BATCHES.iter().enumerate() {
                let default = super::built_in_choice(&family, len)?;
                let Some(default_t) = modelled(default, len, batch, a) else { continue };
                let best = members
                    .iter()
                    .filter_map(|&v| modelled(v, len, batch, a).map(|t| (v, t)))
                    .min_by(|x, y| x.1.total_cmp(&y.1));
                let Some((best, best_t)) = best else { continue };
                if best == default || best_t > 0.95 * default_t {
                    continue;
                }
                entries.push(TuningEntry {
                    family: family.clone(),
                    variant: best.symbol(),
                    max_len: (li + 1 < BUCKET_LENGTHS.len()).then_some(len as u64),
                    max_batch: (bi + 1 < BUCKET_BATCHES.len()).then_some(batch as u64),
                    time_us: None,
                    default_variant: Some(default.symbol()),
                    default_us: None,
                });
            }
        }
    }
    let meta = TuningMeta {
        format: FORMAT.to_string(),
        arch: format!("sm_{arch}"),
        device: None,
        source: TableSource::Model,
        variant_table: variant::table_hash(),
        sm_count: None,
        toolkit: None,
        driver: None,
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
        date: String::new(),
    };
    Tuning::new(meta, entries, &format!("model sm_{arch}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped tables are the model's output for every arch this build compiled (regenerate
    /// with `TRIATTN_BLESS=1 cargo test --features cuda --lib shipped_tables_are_the_model`
    /// under `TRIATTN_CUDA_ARCHS="80;86;89;90"`).
    #[test]
    fn shipped_tables_are_the_model() {
        let built = variant::built_archs();
        if built.is_empty() {
            eprintln!("SKIP shipped_tables_are_the_model: this build compiled no CUDA kernels (no ptxas report)");
            return;
        }
        let bless = std::env::var_os("TRIATTN_BLESS").is_some();
        for a in ARCHS {
            let Some(model) = model_table(a.arch) else { continue };
            if Tuning::shipped(a.arch).is_some_and(|t| t.meta().source == TableSource::Measured) {
                eprintln!("tuning/sm_{}.toml is measured: not compared with the model", a.arch);
                continue;
            }
            let path = format!("{}/tuning/sm_{}.toml", env!("CARGO_MANIFEST_DIR"), a.arch);
            if bless {
                let mut model = model;
                model.meta.date = super::super::today_utc();
                model.write(&path).unwrap();
                continue;
            }
            let shipped = Tuning::shipped(a.arch).expect("a shipped table per modelled arch");
            assert_eq!(
                shipped.entries(),
                model.entries(),
                "tuning/sm_{}.toml is not the model's output for this build: regenerate it (see the test's doc)",
                a.arch
            );
        }
    }

    #[test]
    fn occupancy_follows_the_tightest_limit() {
        let h100 = ARCHS[3];
        let v = variant::compact_variant(CompactMode::OrderPreserving);
        // 256 threads: 8 by threads; 64 registers x 256 = 16K: 4 by registers.
        assert_eq!(occupancy(v, Resources { registers: 64, shared: 8192 }, &h100), 4);
        assert_eq!(occupancy(v, Resources { registers: 32, shared: 8192 }, &h100), 8);
        assert_eq!(occupancy(v, Resources { registers: 32, shared: 100 * 1024 }, &h100), 2);
        // Too few bytes in flight: below the bandwidth; enough blocks: at it.
        let t_small = memory_time(1e9, 100_000, 1024.0, 4, &h100);
        let t_large = memory_time(1e9, 100_000, 65536.0, 4, &h100);
        assert!(t_small > 2.0 * t_large, "{t_small} vs {t_large}");
        assert!((t_large - 1e9 / 3350.0).abs() / t_large < 0.05, "{t_large}");
    }
}
