//! `compact` on the emu backend: the kernel of cuda/compact/compact.cuh run by the SIMT layer,
//! through the same [`CompactSpec`] and [`CompactParams`](crate::cuda::CompactParams) as the GPU.
//! K and V are byte buffers (any dtype); see [`crate::cuda::compact`] for the contract.

use crate::cuda::compact::{CompactAddresses, CompactLayout, CompactSpec, CompactTarget, PositionType};
use crate::error::{Error, Result};

/// The keep sets of a compaction and where each (layer, KV head) finds its own.
#[derive(Clone, Copy, Debug)]
pub struct KeepSets<'a> {
    /// `[S, sets, K]`, each row strictly ascending in `[0, N)`.
    pub keep: &'a [i32],
    /// `[L * Hkv]`: the set of `(l, g)` at `l * Hkv + g`.
    pub set_index: &'a [i32],
    /// The block-table rows of the S sequences, `max_blocks` entries apart (paged caches);
    /// blocks distinct across all sequences.
    pub block_table: Option<&'a [i32]>,
}

/// Positions written by a compaction.
#[derive(Debug)]
pub enum Positions<'a> {
    /// `i32`.
    I32(&'a mut [i32]),
    /// `i64`.
    I64(&'a mut [i64]),
}

/// Positions read by an out-of-place compaction, `[sets, N]`.
#[derive(Clone, Copy, Debug)]
pub enum PositionsRef<'a> {
    /// `i32`.
    I32(&'a [i32]),
    /// `i64`.
    I64(&'a [i64]),
}

impl Positions<'_> {
    fn parts(&mut self) -> (PositionType, usize, u64) {
        match self {
            Positions::I32(p) => (PositionType::I32, p.len(), p.as_mut_ptr() as u64),
            Positions::I64(p) => (PositionType::I64, p.len(), p.as_mut_ptr() as u64),
        }
    }
}

impl PositionsRef<'_> {
    fn parts(&self) -> (PositionType, usize, u64) {
        match self {
            PositionsRef::I32(p) => (PositionType::I32, p.len(), p.as_ptr() as u64),
            PositionsRef::I64(p) => (PositionType::I64, p.len(), p.as_ptr() as u64),
        }
    }
}

/// What an out-of-place compaction writes besides the rows.
#[derive(Debug, Default)]
pub struct CompactExtras<'a> {
    /// `[sets, K]` out: the original slot held by each new slot.
    pub slot_map: Option<&'a mut [i32]>,
    /// Positions `[sets, N]` in and `[sets, K]` out.
    pub positions: Option<(PositionsRef<'a>, Positions<'a>)>,
}

/// Launch a `compact` kernel over raw host addresses.
///
/// # Safety
/// Every address in `at` must point to host memory as [`CompactSpec`] documents (tables of `L`
/// bases to buffers of at least [`CompactSpec::layer_bytes`], keep sets strictly ascending in
/// `[0, N)`, set indices `< sets`, distinct in-range blocks), out-of-place destinations must not
/// overlap their sources, and nothing else may access the outputs meanwhile.
pub unsafe fn launch_compact(spec: &CompactSpec, at: &CompactAddresses) -> Result<()> {
    let params = spec.params(at);
    // SAFETY: the caller's contract; params from a validated spec for its own variant.
    unsafe { super::launch(spec.variant(), &params, spec.grid(), 0) }
}

/// Check the keep sets, set indices and block table against `spec`.
fn check_sets(spec: &CompactSpec, sets: &KeepSets<'_>) -> Result<()> {
    let s = spec.shape();
    let (n, k) = (s.num_slots, s.keep_len);
    if sets.keep.len() != spec.keep_entries() {
        return Err(Error::shape("keep sets", format!("{} x {k} i32", s.num_sets), sets.keep.len()));
    }
    for (i, row) in sets.keep.chunks(k).enumerate() {
        if row[0] < 0 || row[k - 1] as usize >= n || row.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid_argument(
                format!("keep set {i}"),
                format!("strictly ascending slots in 0..{n}"),
                format!("{:?}", &row[..row.len().min(8)]),
            ));
        }
    }
    if sets.set_index.len() != s.num_layers * s.num_kv_heads {
        return Err(Error::shape("set index", s.num_layers * s.num_kv_heads, sets.set_index.len()));
    }
    if let Some(&bad) = sets.set_index.iter().find(|&&i| i < 0 || i as usize >= s.num_sets) {
        return Err(Error::invalid_argument("set index entry", format!("0..{}", s.num_sets), bad));
    }
    if let CompactLayout::Paged { block_size, num_blocks, max_blocks, .. } = s.layout {
        let table =
            sets.block_table.ok_or_else(|| Error::invalid_argument("block table", "present (paged cache)", "none"))?;
        let used = n.div_ceil(block_size);
        let need = (s.num_seqs - 1) * max_blocks + used;
        if table.len() < need {
            return Err(Error::shape("block table", format!("at least {need} entries"), table.len()));
        }
        let mut seen = vec![false; num_blocks];
        for seq in 0..s.num_seqs {
            let row = &table[seq * max_blocks..seq * max_blocks + used];
            for (b, &blk) in row.iter().enumerate() {
                if blk < 0 || blk as usize >= num_blocks || std::mem::replace(&mut seen[blk as usize], true) {
                    return Err(Error::invalid_argument(
                        format!("block table [{}]", seq * max_blocks + b),
                        format!("distinct blocks in 0..{num_blocks}"),
                        blk,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Buffers per tensor the emu entries take: `S * L` tensors (contiguous, sequence `s` at
/// `s * L`) or `L` pools shared by the sequences (paged).
fn buffers(spec: &CompactSpec) -> usize {
    let s = spec.shape();
    match s.layout {
        CompactLayout::Contiguous { .. } => s.num_seqs * s.num_layers,
        CompactLayout::Paged { .. } => s.num_layers,
    }
}

/// The `S * L` base table of `bases` (paged: the `L` pools repeated per sequence).
fn base_table(spec: &CompactSpec, bases: Vec<u64>) -> Vec<u64> {
    match spec.shape().layout {
        CompactLayout::Contiguous { .. } => bases,
        CompactLayout::Paged { .. } => bases.repeat(spec.shape().num_seqs),
    }
}

fn check_layers(spec: &CompactSpec, what: &str, value: bool, destination: bool, lens: &[usize]) -> Result<()> {
    let want = buffers(spec);
    if lens.len() != want {
        return Err(Error::shape(
            what,
            format!("{want} buffers (sequences x layers, or layers when paged)"),
            lens.len(),
        ));
    }
    let need = spec.layer_bytes(value, destination);
    for (l, &len) in lens.iter().enumerate() {
        if len < need {
            return Err(Error::shape(format!("{what} of layer {l}"), format!("at least {need} bytes"), len));
        }
    }
    Ok(())
}

fn check_positions(spec: &CompactSpec, what: &str, ty: PositionType, len: usize, need: usize) -> Result<()> {
    match spec.shape().positions {
        Some(t) if t == ty => {}
        want => return Err(Error::shape(format!("{what} type"), format!("{want:?}"), format!("{ty:?}"))),
    }
    if len != need {
        return Err(Error::shape(what, format!("{need} entries"), len));
    }
    Ok(())
}

fn sets_addresses(sets: &KeepSets<'_>, slot_map: Option<&mut [i32]>) -> CompactAddresses {
    CompactAddresses {
        keep: sets.keep.as_ptr() as u64,
        set_index: sets.set_index.as_ptr() as u64,
        block_table: sets.block_table.map_or(0, |t| t.as_ptr() as u64),
        slot_map: slot_map.map_or(0, |m| m.as_mut_ptr() as u64),
        ..CompactAddresses::default()
    }
}

/// Compact K and V in place (order-preserving or hole-filling, per `spec`), per layer one byte
/// buffer each (a `[Hkv, N, D]` tensor or a block pool); optionally write the slot map
/// `[sets, K]` and rewrite positions `[sets, N]` (the first K of each set become the kept ones).
/// With `spec.shape().num_seqs = S > 1`: `S * L` tensors (sequence `s` at `s * L`) or the `L`
/// shared pools, keep sets, slot map and positions stacked per sequence, S block-table rows.
///
/// # Errors
/// `InvalidArgument` for an out-of-place spec, an unsorted keep set, a bad set index or block
/// table; `ShapeMismatch` for a buffer that does not fit; `Driver` if the SIMT layer fails.
pub fn compact_in_place(
    spec: &CompactSpec,
    k: &mut [&mut [u8]],
    v: &mut [&mut [u8]],
    sets: &KeepSets<'_>,
    slot_map: Option<&mut [i32]>,
    positions: Option<Positions<'_>>,
) -> Result<()> {
    if spec.shape().target != CompactTarget::InPlace {
        return Err(Error::invalid_argument("compaction target", "in place", "out of place"));
    }
    check_sets(spec, sets)?;
    check_layers(spec, "keys", false, false, &k.iter().map(|b| b.len()).collect::<Vec<_>>())?;
    check_layers(spec, "values", true, false, &v.iter().map(|b| b.len()).collect::<Vec<_>>())?;
    if let Some(m) = &slot_map {
        if m.len() != spec.keep_entries() {
            return Err(Error::shape("slot map", spec.keep_entries(), m.len()));
        }
    }
    let mut positions = positions;
    let pos = match positions.as_mut() {
        Some(p) => {
            let (ty, len, addr) = p.parts();
            check_positions(spec, "positions", ty, len, spec.positions_len())?;
            addr
        }
        None => 0,
    };
    let k_table = base_table(spec, k.iter_mut().map(|b| b.as_mut_ptr() as u64).collect());
    let v_table = base_table(spec, v.iter_mut().map(|b| b.as_mut_ptr() as u64).collect());
    let at = CompactAddresses {
        k_src: k_table.as_ptr() as u64,
        k_dst: k_table.as_ptr() as u64,
        v_src: v_table.as_ptr() as u64,
        v_dst: v_table.as_ptr() as u64,
        pos_src: pos,
        pos_dst: pos,
        ..sets_addresses(sets, slot_map)
    };
    // SAFETY: check_sets and check_layers established every access the kernel makes (keep sets
    // sorted and in range, set indices < sets, distinct in-range blocks, buffers at least
    // layer_bytes); the slot map and positions have the spec's lengths; all borrows (exclusive
    // for every output) outlive the synchronous launch.
    unsafe { launch_compact(spec, &at) }
}

/// Compact K and V out of place, order-preserving: `k_out[l]` row `(g, i)` receives `k[l]` row
/// `(g, keep[i])` (destination strides from `spec`), the same for V; optionally the slot map
/// and the kept positions `[sets, K]`.
///
/// # Errors
/// As [`compact_in_place`]; `InvalidArgument` for an in-place spec.
pub fn compact_into(
    spec: &CompactSpec,
    k: &[&[u8]],
    v: &[&[u8]],
    k_out: &mut [&mut [u8]],
    v_out: &mut [&mut [u8]],
    sets: &KeepSets<'_>,
    extras: CompactExtras<'_>,
) -> Result<()> {
    if spec.shape().target != CompactTarget::OutOfPlace {
        return Err(Error::invalid_argument("compaction target", "out of place", "in place"));
    }
    check_sets(spec, sets)?;
    check_layers(spec, "keys", false, false, &k.iter().map(|b| b.len()).collect::<Vec<_>>())?;
    check_layers(spec, "values", true, false, &v.iter().map(|b| b.len()).collect::<Vec<_>>())?;
    check_layers(spec, "key output", false, true, &k_out.iter().map(|b| b.len()).collect::<Vec<_>>())?;
    check_layers(spec, "value output", true, true, &v_out.iter().map(|b| b.len()).collect::<Vec<_>>())?;
    let CompactExtras { slot_map, positions } = extras;
    if let Some(m) = &slot_map {
        if m.len() != spec.keep_entries() {
            return Err(Error::shape("slot map", spec.keep_entries(), m.len()));
        }
    }
    let mut positions = positions;
    let (pos_src, pos_dst) = match positions.as_mut() {
        Some((src, dst)) => {
            let (ty, len, s) = src.parts();
            check_positions(spec, "positions", ty, len, spec.positions_len())?;
            let (ty, len, d) = dst.parts();
            check_positions(spec, "position output", ty, len, spec.positions_out_len())?;
            (s, d)
        }
        None => (0, 0),
    };
    let table = |bufs: &[&[u8]]| base_table(spec, bufs.iter().map(|b| b.as_ptr() as u64).collect());
    let (k_src, v_src) = (table(k), table(v));
    let k_dst = base_table(spec, k_out.iter_mut().map(|b| b.as_mut_ptr() as u64).collect());
    let v_dst = base_table(spec, v_out.iter_mut().map(|b| b.as_mut_ptr() as u64).collect());
    let at = CompactAddresses {
        k_src: k_src.as_ptr() as u64,
        k_dst: k_dst.as_ptr() as u64,
        v_src: v_src.as_ptr() as u64,
        v_dst: v_dst.as_ptr() as u64,
        pos_src,
        pos_dst,
        ..sets_addresses(sets, slot_map)
    };
    // SAFETY: as in compact_in_place; the destinations are exclusive borrows distinct from the
    // shared source borrows, so they do not overlap.
    unsafe { launch_compact(spec, &at) }
}

/// One byte buffer per layer.
pub type LayerBytes = Vec<Vec<u8>>;

/// Dense sizes of the K and V tensors [`gather_kv`] compacts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvDims {
    /// Bytes per element (2 for f16/bf16, 4 for f32).
    pub elem_bytes: usize,
    /// KV heads Hkv.
    pub num_kv_heads: usize,
    /// Slots N of every layer.
    pub num_slots: usize,
    /// K row elements D.
    pub key_dim: usize,
    /// V row elements Dv.
    pub value_dim: usize,
}

/// Order-preserving, out-of-place compaction of dense per-layer `K [Hkv, N, D]` and
/// `V [Hkv, N, Dv]` (bytes of any dtype) into dense `[Hkv, K, ·]` tensors, all layers in one
/// launch: `(l, g)` keeps `keep[set_index[l * Hkv + g]]` (every set `K` ascending slots). What
/// the `compress` command writes, through the compact kernel.
///
/// # Errors
/// `InvalidArgument` for unsorted or unequal keep sets or rows that are not a multiple of 16
/// bytes; `ShapeMismatch` for tensors that do not match `dims`.
pub fn gather_kv(
    dims: KvDims,
    k: &[&[u8]],
    v: &[&[u8]],
    keep: &[Vec<u32>],
    set_index: &[usize],
) -> Result<(LayerBytes, LayerBytes)> {
    use crate::cuda::compact::{CompactShape, RowStrides};
    use crate::variant::CompactMode;
    let KvDims { elem_bytes, num_kv_heads: hkv, num_slots: n, key_dim: d, value_dim: dv } = dims;
    let kept = keep.first().map_or(0, Vec::len);
    if keep.iter().any(|s| s.len() != kept) {
        return Err(Error::invalid_argument("keep sets", format!("{kept} slots each"), "sets of other lengths"));
    }
    let dense = |dim: usize, rows: usize| RowStrides { head_stride: rows * dim, row_stride: dim };
    let spec = CompactSpec::new(CompactShape {
        mode: CompactMode::OrderPreserving,
        target: CompactTarget::OutOfPlace,
        elem_bytes,
        num_layers: k.len(),
        num_kv_heads: hkv,
        num_sets: keep.len(),
        num_slots: n,
        keep_len: kept,
        key_dim: d,
        value_dim: dv,
        layout: CompactLayout::Contiguous {
            k: dense(d, n),
            v: dense(dv, n),
            k_dst: dense(d, kept),
            v_dst: dense(dv, kept),
        },
        positions: None,
        num_seqs: 1,
    })?;
    for (what, bufs, dim) in [("keys", k, d), ("values", v, dv)] {
        if let Some((l, b)) = bufs.iter().enumerate().find(|(_, b)| b.len() != hkv * n * dim * elem_bytes) {
            return Err(Error::shape(
                format!("{what} of layer {l}"),
                format!("{} bytes", hkv * n * dim * elem_bytes),
                b.len(),
            ));
        }
    }
    let flat: Vec<i32> = keep
        .iter()
        .flatten()
        .map(|&s| i32::try_from(s).map_err(|_| Error::invalid_argument("keep slot", "<= i32::MAX", s)))
        .collect::<Result<_>>()?;
    let index: Vec<i32> = set_index.iter().map(|&i| i32::try_from(i).unwrap_or(-1)).collect();
    let mut k_out: Vec<Vec<u8>> = (0..k.len()).map(|_| vec![0xffu8; hkv * kept * d * elem_bytes]).collect();
    let mut v_out: Vec<Vec<u8>> = (0..v.len()).map(|_| vec![0xffu8; hkv * kept * dv * elem_bytes]).collect();
    {
        let mut ko: Vec<&mut [u8]> = k_out.iter_mut().map(|b| &mut b[..]).collect();
        let mut vo: Vec<&mut [u8]> = v_out.iter_mut().map(|b| &mut b[..]).collect();
        let sets = KeepSets { keep: &flat, set_index: &index, block_table: None };
        compact_into(&spec, k, v, &mut ko, &mut vo, &sets, CompactExtras::default())?;
    }
    Ok((k_out, v_out))
}
