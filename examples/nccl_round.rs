//! A TriAttention round as a tensor- and pipeline-parallel engine runs it: one rank per GPU of
//! this node, each planning the round over the heads and layers it holds, the collectives the
//! plans name issued with NCCL on the ranks' streams (feature `nccl`: cudarc's NCCL bindings,
//! `libnccl.so.2` loaded at run time). The keep sets are checked against one unsharded rank.
//!
//! ```text
//! cargo run --release --features nccl --example nccl_round -- [--tp R] [--pp P] [--mode per-head|per-layer-per-head|union]
//! ```
//!
//! `R x P` must not exceed the GPUs of the node; on one GPU (`--tp 1 --pp 1`, the default) the
//! rank is a single-rank communicator and the round runs whole, still through the NCCL setup.
//! Model: the shipped Qwen3-8B config and statistics; the cache: 1,152 random bf16 keys per
//! (layer, KV head).

use std::collections::BTreeMap;
use std::error::Error;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::safe::{Comm, ReduceOp as NcclOp};
use half::bf16;
use triattn::cuda::{
    CacheAddresses, CacheLayout, Compaction, CudaDevice, RoundAddresses, RoundPlan, RoundShape, RowStrides,
    StreamLauncher,
};
use triattn::shard::{ReduceDType, ReduceOp, ShardLayout};
use triattn::tuning::Dispatch;
use triattn::{CompressionConfig, ModelConfig, Scorer, SelectionMode, Stats};

const SLOTS: usize = 1152;
const BUDGET: usize = 1024;
const ROUND_START: i64 = 4096;

/// One rank: its GPU, plan, keys, workspace and round-start slot.
struct Rank {
    dev: CudaDevice,
    plan: RoundPlan,
    keys: Vec<CudaSlice<u8>>,
    workspace: CudaSlice<u8>,
    round_start: CudaSlice<i64>,
}

impl Rank {
    fn stream(&self) -> &Arc<CudaStream> {
        self.dev.stream()
    }

    /// The plan's outputs (the whole workspace back on the host).
    fn keep_sets(&self) -> Result<Vec<Vec<u32>>, Box<dyn Error>> {
        let host = self.stream().clone_dtoh(&self.workspace)?;
        Ok(self.plan.read_outputs(&host)?.keep)
    }

    /// Launch part `part` of the round on the rank's stream.
    fn run_part(&self, part: usize) -> Result<(), Box<dyn Error>> {
        let s = self.stream();
        let cache =
            CacheAddresses { keys: self.keys.iter().map(|k| k.device_ptr(s).0).collect(), ..Default::default() };
        let at = RoundAddresses::bound(self.workspace.device_ptr(s).0, self.round_start.device_ptr(s).0, &cache);
        let mut launcher = StreamLauncher::new(self.dev.backend(), s.cu_stream());
        // SAFETY: the workspace holds the plan's image bound to `keys` (written in `new`), the
        // keys hold the planned rows, `round_start` one i64 >= the slots; the previous part's
        // collective was enqueued on this stream before this launch.
        unsafe { self.plan.run_part(&mut launcher, &at, part)? };
        Ok(())
    }
}

/// The rank's keys of one layer: its KV heads of the `[Hkv, N, D]` tensor.
fn rank_keys(all: &[bf16], heads: std::ops::Range<usize>, d: usize) -> Vec<u8> {
    all[heads.start * SLOTS * d..heads.end * SLOTS * d].iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn new_rank(
    ordinal: usize,
    scorer: &Scorer,
    config: &CompressionConfig,
    shard: Option<&triattn::shard::Shard>,
    keys: &[Vec<bf16>],
) -> Result<Rank, Box<dyn Error>> {
    let dev = CudaDevice::open(ordinal)?;
    let d = scorer.model.head_dim;
    let (layers, heads) = match shard {
        Some(s) => (s.layers.clone(), s.kv_heads.clone()),
        None => (0..scorer.model.num_layers, 0..scorer.model.num_kv_heads),
    };
    let strides = RowStrides { head_stride: SLOTS * d, row_stride: d };
    let shape = RoundShape {
        dtype: triattn::DType::Bf16,
        len: SLOTS,
        prefix_len: 64,
        value_dim: d,
        layout: CacheLayout::Contiguous { keys: strides, values: strides },
        compaction: Compaction::KeepSetsOnly,
        positions: None,
    };
    let dispatch = Dispatch::new(None, Some(dev.backend().arch()));
    let plan = match shard {
        Some(s) => RoundPlan::new_shard(&s.scorer(scorer)?, s, config, shape, &[64], &dispatch)?,
        None => RoundPlan::tuned(scorer, config, shape, &dispatch)?,
    };
    let stream = dev.stream().clone();
    let keys: Vec<CudaSlice<u8>> =
        layers.map(|l| stream.clone_htod(&rank_keys(&keys[l], heads.clone(), d))).collect::<Result<_, _>>()?;
    let cache = CacheAddresses { keys: keys.iter().map(|k| k.device_ptr(&stream).0).collect(), ..Default::default() };
    let mut image = plan.workspace_image(&cache)?;
    image.resize(plan.workspace_bytes(), 0);
    let workspace = stream.clone_htod(&image)?;
    let round_start = stream.clone_htod(&[ROUND_START])?;
    dev.backend().prepare_round(&plan)?;
    Ok(Rank { dev, plan, keys, workspace, round_start })
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (mut tp, mut pp, mut mode) = (1usize, 1usize, SelectionMode::PerHead);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag}: expected a value"))?;
        match flag.as_str() {
            "--tp" => tp = value.parse()?,
            "--pp" => pp = value.parse()?,
            "--mode" => {
                mode = match value.as_str() {
                    "per-head" => SelectionMode::PerHead,
                    "per-layer-per-head" => SelectionMode::PerLayerPerHead,
                    "union" => SelectionMode::Union,
                    other => {
                        return Err(
                            format!("--mode: expected per-head, per-layer-per-head or union, got {other}").into()
                        )
                    }
                }
            }
            other => return Err(format!("unknown flag {other} (--tp, --pp, --mode)").into()),
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = ModelConfig::from_file(root.join("data/qwen3_8b.config.json"))?;
    let scorer = Scorer::new(model.clone(), Stats::load(root.join("data/qwen3_8b.safetensors"))?, None)?;
    let config = CompressionConfig { budget: BUDGET, mode, ..CompressionConfig::default() };
    let layout = ShardLayout::new(&model, tp, pp)?;
    let gpus = CudaContext::device_count()? as usize;
    if layout.ranks() > gpus {
        return Err(format!(
            "tp {tp} x pp {pp}: expected at most the {gpus} GPUs of this node, got {} ranks",
            layout.ranks()
        )
        .into());
    }
    // The cache every rank slices: per layer [Hkv, N, D] bf16.
    let d = model.head_dim;
    let mut x = 0x2545_f491u32;
    let keys: Vec<Vec<bf16>> = (0..model.num_layers)
        .map(|_| {
            (0..model.num_kv_heads * SLOTS * d)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    bf16::from_f32(((x >> 16) % 2001) as f32 / 700.0 - 1.43)
                })
                .collect()
        })
        .collect();

    let shards = layout.shards();
    let mut ranks: Vec<Rank> =
        shards.iter().map(|s| new_rank(s.rank, &scorer, &config, Some(s), &keys)).collect::<Result<_, _>>()?;
    // One communicator per group of ranks that reduce together (rank order within the group).
    let mut comms: BTreeMap<Vec<usize>, Vec<Comm>> = BTreeMap::new();
    for r in ranks[0].plan.reductions().iter().chain(ranks.iter().flat_map(|r| r.plan.reductions())) {
        if !comms.contains_key(&r.ranks) {
            let streams = r.ranks.iter().map(|&i| ranks[i].stream().clone()).collect();
            comms.insert(r.ranks.clone(), Comm::from_devices(streams).map_err(|e| format!("NCCL: {e:?}"))?);
        }
    }
    if layout.ranks() == 1 {
        let comm = Comm::from_devices(vec![ranks[0].stream().clone()]).map_err(|e| format!("NCCL: {e:?}"))?.remove(0);
        println!("rank 0: a single-rank communicator of {} rank(s); the round needs no collective", comm.world_size());
    }

    let parts = ranks[0].plan.parts();
    for part in 0..parts {
        for rank in &ranks {
            rank.run_part(part)?;
        }
        if part + 1 == parts {
            break;
        }
        // Every rank's buffer of collective `part`, all-reduced in place on the rank's stream.
        cudarc::nccl::result::group_start().map_err(|e| format!("NCCL: {e:?}"))?;
        for (i, rank) in ranks.iter_mut().enumerate() {
            let reduction = rank.plan.reductions()[part].clone();
            let region = rank.plan.reduction_region(part)?;
            let comm = &comms[&reduction.ranks][reduction.ranks.iter().position(|&m| m == i).expect("a member")];
            let mut bytes = rank.workspace.slice_mut(region.offset..region.offset + region.bytes);
            let op = match reduction.kind.op() {
                ReduceOp::Max => NcclOp::Max,
                ReduceOp::Sum => NcclOp::Sum,
            };
            match reduction.kind.dtype() {
                ReduceDType::I32 => {
                    // SAFETY: the region holds `len` i32 (the plan's layout).
                    let mut view = unsafe { bytes.transmute_mut::<i32>(reduction.len) }.expect("region of len i32");
                    comm.all_reduce_in_place(&mut view, &op).map_err(|e| format!("NCCL: {e:?}"))?;
                }
                ReduceDType::F64 => {
                    // SAFETY: the region holds `len` f64.
                    let mut view = unsafe { bytes.transmute_mut::<f64>(reduction.len) }.expect("region of len f64");
                    comm.all_reduce_in_place(&mut view, &op).map_err(|e| format!("NCCL: {e:?}"))?;
                }
            }
        }
        cudarc::nccl::result::group_end().map_err(|e| format!("NCCL: {e:?}"))?;
        let r = &ranks[0].plan.reductions()[part];
        println!(
            "collective {part}: {} ({:?}, {} ranks per group), {} bytes per rank",
            r.kind.name(),
            r.kind.dtype(),
            r.ranks.len(),
            r.bytes()
        );
    }

    // Every rank's keep sets against one unsharded round on GPU 0.
    let whole = new_rank(0, &scorer, &config, None, &keys)?;
    whole.run_part(0)?;
    let want = whole.keep_sets()?;
    let hkv = model.num_kv_heads;
    let mut equal = 0;
    for (s, rank) in shards.iter().zip(&ranks) {
        let got = rank.keep_sets()?;
        for (ll, l) in s.layers.clone().enumerate() {
            for (lg, g) in s.kv_heads.clone().enumerate() {
                let (local, global) = (mode.set_index(ll, lg, s.kv_heads.len()), mode.set_index(l, g, hkv));
                if got[local] != want[global] {
                    return Err(format!("rank {}: keep set {global} differs from one rank's", s.rank).into());
                }
                equal += 1;
            }
        }
    }
    println!(
        "tp {tp} x pp {pp} on {} GPU(s), {parts} part(s): {equal} (layer, KV head) keep sets equal one rank's",
        layout.ranks()
    );
    Ok(())
}
